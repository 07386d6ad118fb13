"""Embedding and net regularizers with FuxiCTR's semantics, added to the loss every step.

FuxiCTR (``BaseModel.regularization_loss``) adds, for every ``weight``/``bias`` parameter of the model,
``λ/p·‖W‖ₚᵖ``: with ``embedding_regularizer`` (λ, p) when the parameter belongs to an ``nn.Embedding``
table, else with ``net_regularizer``. A member's config carries both (``MemberConfig``), so every member
of a mutual or collaborative run is penalised with its own values; parameters outside members (the
collaborative head) get none.

Two ways to apply the embedding term (``TrainConfig.embedding_reg_rows``):

* ``all``: the whole table every step, FuxiCTR's semantics. With dense Adam every row moves every step
  anyway, so this adds one pass over the table per step.
* ``batch``: only the distinct rows the batch looked up (a forward hook on each table records them),
  through ``F.embedding`` with the table's own sparse flag, so a sparse optimizer still gets sparse
  gradients and a step touches only those rows: the variant for sparse optimizers and Criteo-size tables.
  Under DDP every rank penalises the union of all ranks' rows (gathered each step), so that the averaged
  gradient equals one process's on the global batch.

``auto`` picks ``all`` with dense Adam and ``batch`` with a sparse optimizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ctr_ensemble.errors import CtrError
from ctr_ensemble.models.base import Member
from ctr_ensemble.training.distributed import Dist, gather_rows

ROWS = ("auto", "all", "batch")


def _norm_p(x: torch.Tensor, p: int) -> torch.Tensor:
    """‖x‖ₚᵖ (p = 1 or 2) in float32."""
    x = x.float()
    return (x * x).sum() if p == 2 else x.abs().sum()


class Regularizer:
    """The penalty of every member inside ``module``; ``penalty()`` → a scalar tensor for the current batch.

    In ``batch`` mode call it after the forward pass of the batch (the hooks have then seen its ids)."""

    def __init__(self, module: nn.Module, rows: str, sparse_optimizer: bool, dist: Dist | None = None):
        self.dist = dist
        if rows not in ROWS:
            raise CtrError(f"embedding_reg_rows must be one of {', '.join(ROWS)}, got {rows!r}")
        self.rows = ("batch" if sparse_optimizer else "all") if rows == "auto" else rows
        self.tables: list[tuple[nn.Embedding, float, int]] = []
        self.net: list[tuple[nn.Parameter, float, int]] = []
        self._ids: dict[int, list[torch.Tensor]] = {}
        seen: set[int] = set()
        for member in (m for m in module.modules() if isinstance(m, Member)):
            cfg = member.config
            for p in (cfg.embedding_regularizer_p, cfg.net_regularizer_p):
                if p not in (1, 2):
                    raise CtrError(f"{type(member).__name__}: regularizer norms must be 1 or 2, got {p}")
            if cfg.embedding_regularizer < 0 or cfg.net_regularizer < 0:
                raise CtrError(f"{type(member).__name__}: regularizer strengths must be >= 0, got embedding "
                               f"{cfg.embedding_regularizer}, net {cfg.net_regularizer}")
            for sub in member.modules():
                for pname, param in sub.named_parameters(recurse=False):
                    if pname not in ("weight", "bias") or not param.requires_grad or id(param) in seen:
                        continue
                    seen.add(id(param))
                    if isinstance(sub, nn.Embedding):
                        if cfg.embedding_regularizer > 0:
                            self.tables.append((sub, cfg.embedding_regularizer, cfg.embedding_regularizer_p))
                    elif cfg.net_regularizer > 0:
                        self.net.append((param, cfg.net_regularizer, cfg.net_regularizer_p))
        self._hooks = []
        if self.rows == "batch":
            for table, _, _ in self.tables:
                self._hooks.append(table.register_forward_hook(self._record))

    def _record(self, module: nn.Module, inputs, output) -> None:
        if module.training:
            self._ids.setdefault(id(module), []).append(inputs[0].detach())

    @property
    def active(self) -> bool:
        return bool(self.tables or self.net)

    def penalty(self) -> torch.Tensor | None:
        """Σ λ/p·‖W‖ₚᵖ over the tables (all rows, or the batch's distinct rows) and the net parameters;
        None when nothing is regularised."""
        if not self.active:
            return None
        terms = []
        for table, lam, p in self.tables:
            if self.rows == "all":
                terms.append(lam / p * _norm_p(table.weight, p))
                continue
            ids = self._ids.pop(id(table), [])
            if not ids:
                continue
            rows = torch.unique(torch.cat([i.reshape(-1) for i in ids]))
            if self.dist is not None and self.dist.active:  # the global batch's rows on every rank
                rows = torch.unique(gather_rows(rows, self.dist).to(rows.device))
            terms.append(lam / p * _norm_p(F.embedding(rows, table.weight, sparse=table.sparse), p))
        for param, lam, p in self.net:
            terms.append(lam / p * _norm_p(param, p))
        self._ids.clear()
        if not terms:
            return None
        return torch.stack(terms).sum()
