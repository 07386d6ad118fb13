"""DCN-V2 (Wang et al., WWW 2021): cross network and deep tower in parallel over field embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ctr_ensemble.features import FeatureSpec
from ctr_ensemble.layers.head import MLP
from ctr_ensemble.layers.interaction import CrossNetV2
from ctr_ensemble.models.base import Member, MemberConfig


@dataclass
class DCNv2Config(MemberConfig):
    cross_layers: int = 3
    low_rank: int = 0  # 0 = full-rank W_l
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0


class DCNv2(Member):
    """repr = [cross(x0) (B, F·D) ‖ deep(x0) (B, hidden[-1])] with x0 the flattened embeddings; head = Linear(H, 1)."""

    def __init__(self, cfg: DCNv2Config, spec: FeatureSpec):
        super().__init__()
        self.embedding = self.make_embedding(spec, cfg.embedding_dim)
        d = self.embedding.n_fields * cfg.embedding_dim
        self.cross = CrossNetV2(d, cfg.cross_layers, cfg.low_rank)
        self.deep = MLP(d, cfg.hidden, cfg.dropout)
        self.repr_dim = d + self.deep.d_out
        self.head = nn.Linear(self.repr_dim, 1)

    def represent(self, cat_ids: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        x0 = self.embedding(cat_ids, num).flatten(1)  # (B, F·D)
        return torch.cat([self.cross(x0), self.deep(x0)], dim=1)  # (B, H)
