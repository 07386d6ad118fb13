"""DCN (Wang et al., ADKDD 2017, "Deep & Cross Network for Ad Click Predictions"): a v1 cross
network and a deep tower in parallel over the flattened field embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field

from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.layers.interaction import CrossNetV1
from ctr_ensemble.models.base import CrossDeepMember, MemberConfig


@dataclass
class DCNConfig(MemberConfig):
    cross_layers: int = 3  # each layer adds one degree of explicit feature crossing
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0


class DCN(CrossDeepMember):
    """repr = [cross(x0) (B, F·D) ‖ deep(x0) (B, hidden[-1])] with x0 the flattened embeddings; head = Linear(H, 1).

    As in the paper, the combination layer is a logistic regression over the stacked cross and
    deep outputs. The v1 cross layer is rank-one (2·F·D parameters per layer), so the cross part
    is nearly free next to the deep tower.
    """

    def __init__(self, cfg: DCNConfig, spec: FeatureSpec):
        super().__init__(spec, cfg.embedding_dim, cfg.hidden, cfg.dropout, lambda d: CrossNetV1(d, cfg.cross_layers),
                         cfg.batch_norm)
