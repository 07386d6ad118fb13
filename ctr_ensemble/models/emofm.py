"""EMOFM (Li & Wu, arXiv 2310.04482): Ensemble MLP mOdel with Feature-based Mixers.

The paper (a CTI competition report) builds "Embedding + MLP" models in three variants and
ensembles them over interaction types. Mapping to code, with F field tokens (26 categorical
then 13 numeric) of dimension D from this member's own embedding tables:

- ``wm`` (Whole MLPs): the plain paradigm, flatten all field embeddings (B, F·D) into one
  MLP (``hidden``). No explicit field structure.
- ``hm`` (Hierarchical MLPs): the whole MLP split into two stages "to focus on feature
  extraction before feature fusion". Stage 1 = one independent MLP per field
  (``field_hidden``, :class:`FieldwiseMLP`, (B, F, D) → (B, F, K), residual: see there why);
  stage 2 = fusion MLP over the concatenated field codes (B, F·K) → (B, hidden[-1]).
- ``hmm`` (Hierarchical MLPs + Mixers): HM with a cross-attention mixer
  (:class:`CrossFieldMixer`, gated residual, each field attends over the other fields) inserted
  before each stage, so the model alternates the paper's two views, inside-field (field-wise
  MLP) and across-field (mixer): mixer(D) → stage 1 → mixer(K) → stage 2.

Type-wise predictors: the paper trains one predictor per interaction type (the "Ftype" field)
and ensembles them. Here ``type_field`` names a categorical field; the model keeps one shared
head plus one linear predictor per id of that field (id 0 = OOV, out-of-range ids → 0, like the
embedding), and the logit of a row is shared(h) + predictor_{t}(h) with t its id, i.e. each type
has its own predictor (w₀ + w_t, b₀ + b_t) selected by a Gather. The paper needs an auxiliary
model because types are unknown at test time; on Criteo-style rows the type field is an input
column, so it is read directly. ``repr`` (the exported, shared representation) is the stage-2
output and does not depend on the type predictor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.errors import CtrError
from ctr_ensemble.layers.head import MLP
from ctr_ensemble.layers.mixer import CrossFieldMixer, FieldwiseMLP, TypeWisePredictor
from ctr_ensemble.models.base import Member, MemberConfig, Tensor

VARIANTS = ("wm", "hm", "hmm")


@dataclass
class EMOFMConfig(MemberConfig):
    variant: str = "hmm"  # "wm" | "hm" | "hmm"
    field_hidden: list[int] = field(default_factory=lambda: [32, 16])  # stage-1 per-field MLP (hm/hmm)
    hidden: list[int] = field(default_factory=lambda: [256, 128])  # stage-2 fusion MLP (whole MLP for wm)
    n_heads: int = 1  # mixer heads (hmm); must divide embedding_dim and field_hidden[-1]; 1 is ~2x faster on CPU
    dropout: float = 0.0
    type_field: str | None = None  # categorical field giving the interaction type, e.g. "C9"


class EMOFM(Member):
    """repr = stage-2 MLP output (B, hidden[-1]); head = Linear(H, 1) (+ type-wise predictors)."""

    def __init__(self, cfg: EMOFMConfig, spec: FeatureSpec):
        super().__init__()
        if cfg.variant not in VARIANTS:
            raise CtrError(f"emofm: unknown variant {cfg.variant!r}; expected one of {', '.join(VARIANTS)}")
        if cfg.variant != "wm" and not cfg.field_hidden:
            raise CtrError(f"emofm: variant {cfg.variant!r} needs a non-empty field_hidden")
        self.embedding = self.make_embedding(spec, cfg.embedding_dim)
        n, d = self.embedding.n_fields, cfg.embedding_dim
        # Identity stand-ins keep represent() one straight-line graph for every variant.
        self.mix1: nn.Module = nn.Identity()
        self.stage1: nn.Module = nn.Identity()
        self.mix2: nn.Module = nn.Identity()
        if cfg.variant != "wm":
            self.stage1 = FieldwiseMLP(n, d, cfg.field_hidden)
            if cfg.variant == "hmm":
                self.mix1 = CrossFieldMixer(n, d, cfg.n_heads)
                self.mix2 = CrossFieldMixer(n, self.stage1.d_out, cfg.n_heads)
            d = self.stage1.d_out
        self.stage2 = MLP(n * d, cfg.hidden, cfg.dropout, cfg.batch_norm)
        self.repr_dim = self.stage2.d_out
        self.head = nn.Linear(self.repr_dim, 1)  # the shared predictor
        self.type_index: int | None = None
        self.type_head: TypeWisePredictor | None = None
        if cfg.type_field is not None:
            names = [f.name for f in spec.categorical]
            if cfg.type_field not in names:
                raise CtrError(f"emofm: type_field {cfg.type_field!r} is not a categorical field of the "
                               f"feature spec; expected one of {', '.join(names)}")
            self.type_index = names.index(cfg.type_field)
            self.type_head = TypeWisePredictor(spec.categorical[self.type_index].size, self.repr_dim)

    def represent(self, cat_ids: Tensor, num: Tensor, seq_ids: Tensor | None = None,
                  seq_len: Tensor | None = None) -> Tensor:
        e = self.embedding(cat_ids, num, seq_ids, seq_len)  # (B, F, D)
        z = self.mix2(self.stage1(self.mix1(e)))  # (B, F, K): field-wise extraction, across-field mixing
        return self.stage2(z.flatten(1))  # (B, H): fusion

    def logits(self, cat_ids: Tensor, num: Tensor, seq_ids: Tensor | None = None,
               seq_len: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = self.represent(cat_ids, num, seq_ids, seq_len)
        logit = self.head(h)  # (B, 1)
        if self.type_head is not None:  # fixed at construction, not data-dependent
            logit = logit + self.type_head(h, cat_ids[:, self.type_index])
        return logit, h
