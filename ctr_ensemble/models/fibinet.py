"""FiBiNET (Huang et al., RecSys 2019, "Combining Feature Importance and Bilinear feature
Interaction for CTR Prediction"): SENET field re-weighting, bilinear interactions of the raw
and re-weighted embeddings, a deep tower, and a first-order linear part."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.errors import CtrError
from ctr_ensemble.layers.head import MLP
from ctr_ensemble.layers.interaction import BILINEAR_TYPES, Bilinear, SENet
from ctr_ensemble.models.base import Member, MemberConfig, Tensor


@dataclass
class FiBiNETConfig(MemberConfig):
    # The tower input is 2·F(F−1)/2·D = 11,856 wide at F=39, D=8, so its first layer dominates the
    # cost. D=8 (paper: 10) and a [64, 32] tower keep a CPU epoch within ~2× DCN-V2's; [256, 128]
    # with D=10 is ~6× slower, and on the demo data [128, 64] was both slower and no better.
    embedding_dim: int = 8
    reduction_ratio: int = 3  # SENET bottleneck F/r, the paper's default
    bilinear_type: str = "field_all"  # cheapest of the paper's three; or "field_each" / "field_interaction"
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.0


class FiBiNET(Member):
    """repr = [deep([p ‖ q]) (B, hidden[-1]) ‖ first-order sum (B, 1)]; head = Linear(H, 1).

    p = Bilinear(E) and q = Bilinear'(SENET(E) ⊙ E), each (B, F(F−1)/2, D), with separate
    weights as in the paper; the head's weight on the first-order sum is the paper's linear part.
    """

    def __init__(self, cfg: FiBiNETConfig, spec: FeatureSpec):
        super().__init__()
        if cfg.bilinear_type not in BILINEAR_TYPES:
            raise CtrError(f"fibinet: bilinear_type must be one of {list(BILINEAR_TYPES)}, got {cfg.bilinear_type!r}")
        self.embedding = self.make_embedding(spec, cfg.embedding_dim)
        self.linear = self.make_embedding(spec, 1)  # first-order weights, one scalar per id
        f, d = self.embedding.n_fields, cfg.embedding_dim
        self.senet = SENet(f, cfg.reduction_ratio)
        self.bilinear_e = Bilinear(f, d, cfg.bilinear_type)
        self.bilinear_v = Bilinear(f, d, cfg.bilinear_type)
        self.deep = MLP(2 * (f * (f - 1) // 2) * d, cfg.hidden, cfg.dropout, cfg.batch_norm)
        self.repr_dim = self.deep.d_out + 1
        self.head = nn.Linear(self.repr_dim, 1)

    def represent(self, cat_ids: Tensor, num: Tensor, seq_ids: Tensor | None = None,
                  seq_len: Tensor | None = None) -> Tensor:
        e = self.embedding(cat_ids, num, seq_ids, seq_len)  # (B, F, D)
        v = e * self.senet(e).unsqueeze(-1)  # (B, F, D) re-weighted by field importance
        pq = torch.cat([self.bilinear_e(e).flatten(1), self.bilinear_v(v).flatten(1)], dim=1)  # (B, 2·P·D)
        first = self.linear(cat_ids, num, seq_ids, seq_len).sum(dim=1)  # (B, 1)
        return torch.cat([self.deep(pq), first], dim=1)  # (B, H)
