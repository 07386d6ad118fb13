"""Logistic regression (FuxiCTR's ``LR``): one learned weight per categorical id, a linear term per numeric
field and a bias, the first-order part of DeepFM / FiBiNET on its own. The ensemble's cheap baseline."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.errors import CtrError
from ctr_ensemble.models.base import Member, MemberConfig, Tensor


@dataclass
class LRConfig(MemberConfig):
    """Only the regularizers are free: the weights are scalars (``embedding_dim`` 1) and there is no MLP
    tower (``batch_norm`` off, no ``hidden`` / ``dropout``); another value is an error, never ignored."""

    embedding_dim: int = 1


class LR(Member):
    """repr = the first-order terms, one per field (B, F); head = Linear(F, 1), started at all-ones weights
    and a zero bias, so that the initial logit is FuxiCTR's Σᵢ wᵢ + b.

    Field i's term is the weight of its id (OOV id 0 for an unknown one); numeric field j's is z_j·v_j with
    z_j the embedding's standardised sign·log1p transform (a learned weight of its own when the value is
    missing); with a behaviour sequence, the mean weight of the history's items. The head's per-field scales
    leave the model class that of plain LR (each is absorbed by that field's weights).
    """

    xavier_init = False  # the head starts as the plain sum (see above), not at random

    def __init__(self, cfg: LRConfig, spec: FeatureSpec):
        super().__init__()
        if cfg.embedding_dim != 1:
            raise CtrError(f"lr: the weights are scalars, embedding_dim must be 1, got {cfg.embedding_dim}")
        if cfg.batch_norm:
            raise CtrError("lr: there is no MLP tower, batch_norm must be false")
        self.embedding = self.make_embedding(spec, 1)  # first-order weights, one scalar per id
        self.repr_dim = self.embedding.n_fields
        self.head = nn.Linear(self.repr_dim, 1)
        nn.init.ones_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def represent(self, cat_ids: Tensor, num: Tensor, seq_ids: Tensor | None = None,
                  seq_len: Tensor | None = None) -> Tensor:
        return self.embedding(cat_ids, num, seq_ids, seq_len).squeeze(-1)  # (B, F, 1) → (B, F)

