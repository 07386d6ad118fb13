"""IPNN (Qu et al., ICDM 2016, "Product-based Neural Networks for User Response Prediction"):
a product layer of linear signals and pairwise inner products feeding a deep tower."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.layers.head import MLP
from ctr_ensemble.layers.interaction import InnerProduct
from ctr_ensemble.models.base import Member, MemberConfig, Tensor


@dataclass
class PNNConfig(MemberConfig):
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    dropout: float = 0.0


class PNN(Member):
    """repr = deep([l_z (B, F·D) ‖ l_p (B, F(F−1)/2)]) (B, hidden[-1]); head = Linear(H, 1).

    l_z is the flattened embeddings (the paper's linear signals) and l_p every inner product
    <e_i, e_j>, i < j. The paper's product layer, Σ W_z ⊙ z + Σ W_p ⊙ p + b followed by ReLU,
    is exactly the first Linear + ReLU of the tower applied to this concatenation, so the full
    (not the low-rank θθᵀ) IPNN is used.
    """

    def __init__(self, cfg: PNNConfig, spec: FeatureSpec):
        super().__init__()
        self.embedding = self.make_embedding(spec, cfg.embedding_dim)
        f = self.embedding.n_fields
        self.product = InnerProduct(f)
        self.deep = MLP(f * cfg.embedding_dim + self.product.n_pairs, cfg.hidden, cfg.dropout, cfg.batch_norm)
        self.repr_dim = self.deep.d_out
        self.head = nn.Linear(self.repr_dim, 1)

    def represent(self, cat_ids: Tensor, num: Tensor, seq_ids: Tensor | None = None,
                  seq_len: Tensor | None = None) -> Tensor:
        e = self.embedding(cat_ids, num, seq_ids, seq_len)  # (B, F, D)
        return self.deep(torch.cat([e.flatten(1), self.product(e)], dim=1))  # (B, H)
