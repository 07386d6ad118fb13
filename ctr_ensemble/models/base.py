"""The member contract every model follows.

A member maps ``cat_ids`` (B, n_cat) int64 and raw ``num`` (B, n_num) float32 (and, when the
feature spec has a behaviour sequence, ``seq_ids`` (B, L) int64 with ``seq_len`` (B, 1) int64)
to ``prob`` (B, 1), the click probability, and ``repr`` (B, H), its final representation
(what a collaborative-ensemble head consumes). ``forward`` returns exactly what is
exported to ONNX; the trainer uses ``logits`` for a numerically stable loss. Which inputs
a member takes is ``FeatureSpec.input_names``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.layers.embedding import FeatureEmbedding
from ctr_ensemble.layers.head import MLP

OUTPUT_NAMES = ("prob", "repr")
Tensor = torch.Tensor


@dataclass
class MemberConfig:
    """Fields every member config has.

    The regularizers have FuxiCTR's semantics (``embedding_regularizer`` / ``net_regularizer``): λ/p·‖W‖ₚᵖ
    added to the loss every step, over each embedding table and over every other weight and bias of the
    member (``training/regularize.py``). ``batch_norm`` and ``dropout`` (in each subclass) act on every
    hidden layer of the member's MLP tower(s), FuxiCTR's ``batch_norm`` / ``net_dropout``."""

    embedding_dim: int = 16
    embedding_regularizer: float = 0.01  # λ of the tables' penalty (FuxiCTR embedding_regularizer)
    embedding_regularizer_p: int = 2  # 2 = l2(λ), 1 = l1(λ)
    net_regularizer: float = 0.0  # λ of every other weight/bias (FuxiCTR net_regularizer)
    net_regularizer_p: int = 2
    batch_norm: bool = False  # BatchNorm after each hidden Linear of the MLP tower(s)


class Member(nn.Module):
    """Base class: subclasses build ``self.embedding`` and implement ``represent`` and ``head``."""

    repr_dim: int
    head: nn.Module
    config: MemberConfig  # set by models.build: the regularizers read it
    xavier_init = True  # models.build re-initialises every nn.Linear Xavier-normal (see there)

    @staticmethod
    def make_embedding(spec: FeatureSpec, dim: int, pool_sequence: bool = True) -> FeatureEmbedding:
        """Field embeddings; with a sequence field, the pooled history is one more field token
        unless ``pool_sequence`` is False (members with their own sequence arch)."""
        return FeatureEmbedding(
            spec.cat_sizes, [f.mean for f in spec.numeric], [f.std for f in spec.numeric], dim,
            seq_size=spec.sequence.size if spec.sequence else 0, pool_sequence=pool_sequence,
        )

    def represent(self, cat_ids: Tensor, num: Tensor, seq_ids: Tensor | None = None,
                  seq_len: Tensor | None = None) -> Tensor:  # (B, H)
        raise NotImplementedError

    def logits(self, cat_ids: Tensor, num: Tensor, seq_ids: Tensor | None = None,
               seq_len: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = self.represent(cat_ids, num, seq_ids, seq_len)
        return self.head(h), h  # (B, 1), (B, H)

    def forward(self, cat_ids: Tensor, num: Tensor | None = None, seq_ids: Tensor | None = None,
                seq_len: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if num is None:  # data without numeric fields: the exported model has no `num` input
            num = cat_ids[:, :0].to(torch.float32)  # (B, 0)
        logit, h = self.logits(cat_ids, num, seq_ids, seq_len)
        return torch.sigmoid(logit), h


class CrossDeepMember(Member):
    """The DCN family's skeleton: repr = [cross(x0) (B, F·D) ‖ deep(x0) (B, hidden[-1])], x0 the flattened
    field embeddings; head = Linear(H, 1). Subclasses pass the cross network to use."""

    def __init__(self, spec: FeatureSpec, embedding_dim: int, hidden: list[int], dropout: float, make_cross,
                 batch_norm: bool = False):
        super().__init__()
        self.embedding = self.make_embedding(spec, embedding_dim)
        d = self.embedding.n_fields * embedding_dim
        self.cross = make_cross(d)
        self.deep = MLP(d, hidden, dropout, batch_norm)
        self.repr_dim = d + self.deep.d_out
        self.head = nn.Linear(self.repr_dim, 1)

    def represent(self, cat_ids: Tensor, num: Tensor, seq_ids: Tensor | None = None,
                  seq_len: Tensor | None = None) -> Tensor:
        x0 = self.embedding(cat_ids, num, seq_ids, seq_len).flatten(1)  # (B, F·D)
        return torch.cat([self.cross(x0), self.deep(x0)], dim=1)  # (B, H)
