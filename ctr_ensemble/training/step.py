"""One training step and the scoring of validation rows, shared by every trainer (member, mutual, collab).

``TrainStep`` builds the optimisers (``Optimizers``: dense Adam, or a sparse optimizer over the embedding
tables), the row feed (``Feed``: in-memory ``Rows`` or ``loader.Batches`` over prepared shards, DDP streams,
prefetch), the DDP / torch.compile wrapping of the forward (``Logits``), bf16 autocast and the members'
regularizers; ``score_rows`` / ``evaluate_rows`` score validation data on every rank alike."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ctr_ensemble import metrics
from ctr_ensemble.data.encode import Arrays
from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.errors import CtrError
from ctr_ensemble.models.base import Member
from ctr_ensemble.training import distributed, loader
from ctr_ensemble.training.config import OPTIMIZERS, TrainConfig
from ctr_ensemble.training.distributed import Dist
from ctr_ensemble.training.regularize import Regularizer


class Logits(nn.Module):
    """The training step's forward, feeds by name → ``model.logits(...)``: what DDP and torch.compile wrap.

    For a member (``first=True``) its logits (B, 1). With ``first=False`` whatever ``model.logits`` gives:
    member logits (B, N) for ``mutual.Members``, (fused (B, 1), member logits (B, N), weights (B, N)) for
    ``ensemble.CollaborativeModel``. DDP must wrap the module whose forward the step calls."""

    def __init__(self, model: nn.Module, first: bool = True):
        super().__init__()
        self.model, self.first = model, first

    def forward(self, cat_ids: torch.Tensor, num: torch.Tensor | None = None, seq_ids: torch.Tensor | None = None,
                seq_len: torch.Tensor | None = None):
        if num is None:  # data without numeric fields
            num = cat_ids[:, :0].to(torch.float32)
        out = self.model.logits(cat_ids, num, seq_ids, seq_len)
        return out[0] if self.first else out


class Optimizers:
    """Adam over everything (``adam``), or a sparse optimizer over the embedding tables (switched to sparse
    gradients here) plus Adam over the dense parameters; one ``zero_grad``/``step``/``state_dict`` for all.

    With a sparse optimizer the tables get the same coupled L2 as dense Adam's ``weight_decay`` (wd·w added
    to the gradient), but only on the rows in the batch, so a step still touches only those rows. Dense
    Adam also keeps moving a row with its momentum after the row leaves the batch, which lazy sparse updates
    do not: ``emb_lr`` (default 5 × ``lr``) makes up for it. Measured (``make bench-train``): without the L2
    sparse Adam loses ~0.005 val AUC against dense Adam, with both it matches it.
    Reusable by any trainer: build it on the module that holds every member."""

    SPARSE_LR_FACTOR = 5.0

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        if cfg.optimizer not in OPTIMIZERS:
            raise CtrError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
        self.tables: list[nn.Embedding] = []
        self.weight_decay = cfg.weight_decay
        if cfg.optimizer == "adam":
            self.opts = [torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)]
            return
        self.tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        for m in self.tables:
            m.sparse = True
        sparse_ids = {id(m.weight) for m in self.tables}
        dense = [p for p in model.parameters() if id(p) not in sparse_ids]
        lr = cfg.emb_lr or cfg.lr * self.SPARSE_LR_FACTOR
        emb = [m.weight for m in self.tables]
        sparse = torch.optim.SparseAdam(emb, lr=lr) if cfg.optimizer == "sparse_adam" else torch.optim.Adagrad(emb, lr=lr)
        self.opts = [sparse, torch.optim.Adam(dense, lr=cfg.lr, weight_decay=cfg.weight_decay)]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        for m in self.tables:  # lazy coupled L2: wd·w on the rows in the batch only
            if m.weight.grad is not None:
                g = m.weight.grad.coalesce()  # once: the sparse optimizer then skips its own coalesce
                if self.weight_decay:
                    g.values().add_(m.weight[g.indices()[0]], alpha=self.weight_decay)
                m.weight.grad = g
        for o in self.opts:
            o.step()

    def state_dict(self) -> dict:
        return {"opts": [o.state_dict() for o in self.opts]}

    def load_state_dict(self, state: dict) -> None:
        for o, s in zip(self.opts, state["opts"]):
            o.load_state_dict(s)


class Rows:
    """Training rows as tensors, sliced per batch by row ids."""

    def __init__(self, arr: Arrays):
        # `num` stays even when it has no column: members' `logits` take it positionally (B, 0).
        self.inputs = {"cat_ids": torch.from_numpy(arr.cat_ids), "num": torch.from_numpy(arr.num)}
        if arr.seq_ids is not None:
            self.inputs["seq_ids"], self.inputs["seq_len"] = torch.from_numpy(arr.seq_ids), torch.from_numpy(arr.seq_len)
        self.label = torch.from_numpy(arr.label.astype(np.float32))  # (N,)

    def take(self, idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Model inputs by name and labels (B,) for rows ``idx``."""
        return {k: v[idx] for k, v in self.inputs.items()}, self.label[idx]


class Feed:
    """A trainer's training rows. ``batches``: the ``loader.Batches`` that ``loop.run`` walks (prepared folders,
    DDP, a GPU, several streams or block shuffling), or None: in memory, one process on the CPU, the loop
    shuffles row ids itself and ``Rows`` gathers them. ``feed(batch)``: what ``Task.loss`` gets → (model
    inputs by name, labels (B,)) on the training device."""

    def __init__(self, train, spec: FeatureSpec, cfg: TrainConfig, dist: Dist):
        self.device = dist.device
        self.batches: loader.Batches | None = None
        self.rows: Rows | None = None
        prepared = hasattr(train, "read")
        if prepared or dist.active or dist.device.type != "cpu" or cfg.streams > 1 or cfg.shuffle == "block":
            shuffle = cfg.shuffle if cfg.shuffle != "auto" else ("block" if prepared else "full")
            self.batches = loader.Batches(train, spec.input_names, loader.LoaderConfig(
                batch_size=cfg.batch_size, seed=cfg.seed, shuffle=shuffle, block_rows=cfg.block_rows,
                buffer_rows=cfg.buffer_rows, streams=cfg.streams, prefetch=cfg.prefetch),
                dist.rank, dist.world, dist.device)
        else:
            self.rows = Rows(train)

    def __call__(self, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x, y = self.rows.take(batch) if self.rows is not None else batch
        if self.device.type != "cpu":
            x = {k: v.to(self.device, non_blocking=True) for k, v in x.items()}
            y = y.to(self.device, non_blocking=True)
        return x, y


class TrainStep:
    """What every trainer builds around the module it trains (a member, ``mutual.Members``, the collaborative
    model): its ``Optimizers``, its rows (``feed``; ``feed.batches`` goes to ``loop.run``) and the forward of one
    step: ``Logits(model)`` under DDP (when distributed), torch.compile (``cfg.compile``) and bf16 autocast
    (``cfg.amp``). ``step(batch)`` → (the logits ``Logits`` gives, labels (B,)). Call ``check_options`` first."""

    def __init__(self, model: nn.Module, train, spec: FeatureSpec, cfg: TrainConfig, dist: Dist, first: bool = True):
        # Optimizers first: a sparse optimizer switches the tables to sparse gradients, which DDP must see.
        self.opt = Optimizers(model, cfg)
        forward = distributed.wrap(Logits(model, first), dist)
        self.forward = torch.compile(forward) if cfg.compile else forward
        self.amp = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16")
        self.feed = Feed(train, spec, cfg, dist)
        self.reg = Regularizer(model, cfg.embedding_reg_rows, sparse_optimizer=cfg.optimizer != "adam", dist=dist)

    def __call__(self, batch):
        x, y = self.feed(batch)
        with self.amp:
            return self.forward(**x), y

    def regularized(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """``loss`` plus the members' regularizers for the batch just forwarded (``regularize.py``); the penalty
        is added to ``parts`` as ``reg`` (the history's ``train_reg``)."""
        pen = self.reg.penalty()
        if pen is None:
            return loss
        parts["reg"] = pen.detach()
        return loss + pen


def val_metrics(y: np.ndarray, p: np.ndarray, suffix: str = "") -> dict[str, float]:
    """``val_auc`` and ``val_logloss`` (with an optional ``_suffix``); AUC 0 when undefined."""
    return {f"val_auc{suffix}": metrics.auc(y, p) or 0.0, f"val_logloss{suffix}": metrics.logloss(y, p)}


def _labels(data) -> np.ndarray:
    return data.labels() if hasattr(data, "labels") else data.label


def score_rows(model: nn.Module, score, data, spec: FeatureSpec, batch_size: int, dist: Dist,
               cols: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), ``score(**feeds)`` of every row (N, *cols) float32) with ``model`` in eval mode: each rank
    scores its contiguous share, every rank gets all rows in order (so all ranks decide alike)."""
    n = len(data)
    lo, hi = distributed.split_range(n, dist)
    model.eval()
    s = loader.score_source(score, data, spec.input_names, lo, hi, batch_size, dist.device, cols)
    return _labels(data)[:n], distributed.gather_rows(s, dist).cpu().numpy()


def evaluate_rows(model: Member, data, spec: FeatureSpec, batch_size: int, dist: Dist) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of every row of ``data``: each rank scores its share, all ranks get all."""
    return score_rows(model, lambda **x: model(**x)[0][:, 0], data, spec, batch_size, dist)
