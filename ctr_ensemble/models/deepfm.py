"""DeepFM (Guo et al., IJCAI 2017): first-order + FM + deep tower over shared field embeddings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.layers.head import MLP
from ctr_ensemble.layers.interaction import FactorizationMachine
from ctr_ensemble.models.base import Member, MemberConfig, Tensor


@dataclass
class DeepFMConfig(MemberConfig):
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0


class DeepFM(Member):
    """repr = [deep tower (B, hidden[-1]) ‖ FM vector (B, D) ‖ first-order sum (B, 1)]; head = Linear(H, 1).

    The linear head over the three parts generalises DeepFM's plain sum of the three logits.
    """

    def __init__(self, cfg: DeepFMConfig, spec: FeatureSpec):
        super().__init__()
        self.embedding = self.make_embedding(spec, cfg.embedding_dim)
        self.linear = self.make_embedding(spec, 1)  # first-order weights, one scalar per id
        self.fm = FactorizationMachine()
        self.deep = MLP(self.embedding.n_fields * cfg.embedding_dim, cfg.hidden, cfg.dropout, cfg.batch_norm)
        self.repr_dim = self.deep.d_out + cfg.embedding_dim + 1
        self.head = nn.Linear(self.repr_dim, 1)

    def represent(self, cat_ids: Tensor, num: Tensor, seq_ids: Tensor | None = None,
                  seq_len: Tensor | None = None) -> Tensor:
        e = self.embedding(cat_ids, num, seq_ids, seq_len)  # (B, F, D)
        first = self.linear(cat_ids, num, seq_ids, seq_len).sum(dim=1)  # (B, 1)
        return torch.cat([self.deep(e.flatten(1)), self.fm(e), first], dim=1)  # (B, H)
