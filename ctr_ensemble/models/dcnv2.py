"""DCN-V2 (Wang et al., WWW 2021): cross network and deep tower in parallel over field embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field

from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.layers.interaction import CrossNetV2
from ctr_ensemble.models.base import CrossDeepMember, MemberConfig


@dataclass
class DCNv2Config(MemberConfig):
    cross_layers: int = 3
    low_rank: int = 0  # 0 = full-rank W_l
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0


class DCNv2(CrossDeepMember):
    """repr = [cross(x0) (B, F·D) ‖ deep(x0) (B, hidden[-1])] with x0 the flattened embeddings; head = Linear(H, 1)."""

    def __init__(self, cfg: DCNv2Config, spec: FeatureSpec):
        super().__init__(spec, cfg.embedding_dim, cfg.hidden, cfg.dropout,
                         lambda d: CrossNetV2(d, cfg.cross_layers, cfg.low_rank), cfg.batch_norm)
