"""Independent training of one member: BCE + Adam, early stopping on validation AUC (loop in ``loop.py``).

Training data is in-memory ``Arrays`` or a prepared folder (``shards.Prepared``, read through
``loader.Batches``); optional sparse embedding updates (``Optimizers``), bf16 autocast, torch.compile, and
data parallelism over torchrun processes (``distributed``)."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctr_ensemble import metrics, models
from ctr_ensemble.data.encode import Arrays
from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.errors import CtrError
from ctr_ensemble.models.base import Member, MemberConfig
from ctr_ensemble.models.checkpoint import Checkpoint
from ctr_ensemble.training import distributed, loader, loop
from ctr_ensemble.training.regularize import Regularizer
from ctr_ensemble.training.distributed import Dist
from ctr_ensemble.training.loop import LoopConfig


def setting(default, help: str):
    """A config dataclass field with its help text: the one declaration the command-line options are generated
    from (``cli/options.py``)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """How a member (or a set of members) is trained; every trainer takes it whole, every training command
    offers each field as ``--field-name``."""

    epochs: int = setting(100, "The most epochs; early stopping on the val metric (--select) normally ends training "
                               "first (loop.py).")
    batch_size: int = setting(512, "Global batch size (split over torchrun processes).")
    lr: float = setting(2e-3, "Adam learning rate.")
    weight_decay: float = setting(0.0, "Adam's coupled L2 on every parameter (0 = off; the members' "
                                       "embedding_regularizer / net_regularizer, set with --set, are the usual "
                                       "regularizers).")
    patience: int = setting(2, "Epochs in a row without a better val metric that stop training (FuxiCTR's "
                               "early_stop_patience; the best epoch's weights are kept).")
    plateau_factor: float = setting(0.1, "Learning-rate factor after each epoch without a better val metric "
                                         "(reduce-LR-on-plateau, FuxiCTR's default; 1 = off).")
    min_lr: float = setting(1e-6, "Reduce-LR-on-plateau never goes below this.")
    seed: int = setting(42, "Seed of the weights' initialisation and of the row order.")
    eval_batch_size: int = setting(16384, "Rows per batch when scoring the validation data.")
    max_steps: int = setting(0, "Stop after this many optimiser steps (0 = no limit); for smoke checks.")
    lr_decay: float = setting(1.0, "Learning-rate factor per epoch, applied every step (1 = constant).")
    save_every: int = setting(0, "Optimiser steps between saved training states (0 = at the end of each epoch only).")
    optimizer: str = setting("adam", "adam (dense, every row each step) | sparse_adam | sparse_adagrad (sparse "
                                     "embedding updates; not on NCCL; see Optimizers).")
    emb_lr: float = setting(0.0, "Learning rate of the embedding tables with a sparse optimizer (0 = 5 x --lr).")
    embedding_reg_rows: str = setting("auto", "Embedding regularizer over: all (every table row each step, "
                                              "FuxiCTR's semantics), batch (the rows the batch looked up; for sparse "
                                              "optimizers and huge tables), auto (all with adam, batch with sparse "
                                              "ones) (regularize.py).")
    amp: str = setting("none", "none | bf16: autocast the training forward to bfloat16 (for GPUs; slow on CPUs "
                               "without bf16 units).")
    compile: bool = setting(False, "torch.compile the training forward (dense --optimizer adam only).")
    device: str = setting("auto", "auto (CUDA if torch sees it) | cpu | cuda.")
    shuffle: str = setting("auto", "auto (a full permutation for in-memory rows, block shuffle for prepared shards) "
                                   "| full | block.")
    block_rows: int = setting(8192, "Block shuffle: rows read contiguously.")
    buffer_rows: int = setting(262144, "Block shuffle: rows shuffled together.")
    streams: int = setting(0, "Row streams (0 = one per process); --streams N on one process reproduces an "
                              "N-process run's batches.")
    prefetch: int = setting(0, "Batches built ahead by a thread (>= 1 on CUDA).")
    select: str = setting("auc", "Validation metric for model selection, early stopping and reduce-LR-on-plateau: "
                                 "auc (highest) or logloss (lowest; the loop maximises its negative).")

    def loop(self) -> LoopConfig:
        return LoopConfig(epochs=self.epochs, batch_size=self.batch_size, patience=self.patience, seed=self.seed,
                          max_steps=self.max_steps, lr_decay=self.lr_decay, save_every=self.save_every,
                          plateau_factor=self.plateau_factor, min_lr=self.min_lr)


# Embedding tables (nn.Embedding) get sparse gradients with the sparse optimizers: a step touches only
# the rows in the batch instead of the whole table; everything else keeps Adam (+ weight decay).
OPTIMIZERS = ("adam", "sparse_adam", "sparse_adagrad")
AMP = ("none", "bf16")


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


SELECT = ("auc", "logloss")


def selection_score(metrics_: dict, select: str, suffix: str = "") -> float:
    """The loop's score (higher is better) of validation ``metrics_`` (``val_metrics``): AUC or −logloss."""
    return metrics_[f"val_auc{suffix}"] if select == "auc" else -metrics_[f"val_logloss{suffix}"]


def check_options(cfg: TrainConfig, dist: Dist) -> None:
    """Refuse option combinations that cannot work, before anything is built (every trainer)."""
    if cfg.amp not in AMP:
        raise CtrError(f"amp must be one of {', '.join(AMP)}, got {cfg.amp!r}")
    if cfg.select not in SELECT:
        raise CtrError(f"select must be one of {', '.join(SELECT)} (the validation metric that picks the best epoch), "
                       f"got {cfg.select!r}")
    if dist.backend == "nccl" and cfg.optimizer != "adam":
        raise CtrError(f"--optimizer {cfg.optimizer}: NCCL cannot all-reduce sparse gradients "
                       "(pytorch/pytorch#22400); use --optimizer adam for multi-GPU runs")
    if cfg.compile and cfg.optimizer != "adam":
        raise CtrError(f"--compile works with --optimizer adam only: torch.compile (inductor) cannot produce the "
                       f"sparse embedding gradients of {cfg.optimizer}")


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


def unique_names(names: list[str]) -> list[str]:
    """Member names for an ensemble: repeats get ``_2``, ``_3``, … (``deepfm, deepfm`` → ``deepfm, deepfm_2``)."""
    count: dict[str, int] = {}
    out = []
    for n in names:
        count[n] = count.get(n, 0) + 1
        out.append(n if count[n] == 1 else f"{n}_{count[n]}")
    return out


def run_identity(trainer: str, spec: FeatureSpec, train, cfg: TrainConfig, dist: Dist, **what) -> dict:
    """What a resume state must match (``loop.run``'s ``run_id``): the trainer, ``what`` it trains, the data
    and every setting."""
    return {"trainer": trainer, **what, "spec": spec.fingerprint(), "train_rows": len(train), "train_config": asdict(cfg),
            "processes": dist.world}


def train_member(
    name: str,
    arch: str,
    model_cfg: MemberConfig,
    spec: FeatureSpec,
    train,
    val,
    cfg: TrainConfig,
    history_csv: Path | None = None,
    state_path: Path | None = None,
    resume: bool = False,
    dist: Dist | None = None,
    on_epoch=None,
) -> Checkpoint:
    """Train a member from scratch and return the checkpoint of its best validation epoch.

    ``train``/``val`` are in-memory ``Arrays`` or ``shards.Prepared`` folders. Under torchrun pass
    ``dist = distributed.setup()``: each process trains on its own rows, gradients are averaged (DDP),
    every process gets the same validation AUC, and the caller saves the checkpoint on rank 0 only.
    ``on_epoch(epoch, history row)`` runs after each epoch (``loop.run``), e.g. a tuner's pruning check."""
    dist = dist or Dist(device=distributed.resolve_device(cfg.device))
    check_options(cfg, dist)
    torch.manual_seed(cfg.seed)
    model = models.build(arch, model_cfg, spec).to(dist.device)
    step = TrainStep(model, train, spec, cfg, dist)
    loss_fn = nn.BCEWithLogitsLoss()

    def loss(batch):
        logit, y = step(batch)  # (B, 1), (B,)
        value = loss_fn(logit[:, 0].float(), y)
        parts = {"logloss": value.detach()}
        return step.regularized(value, parts), parts

    def evaluate():
        m = val_metrics(*evaluate_rows(model, val, spec, cfg.eval_batch_size, dist))
        return selection_score(m, cfg.select), m

    run_id = run_identity("member", spec, train, cfg, dist, name=name, arch=arch, model_config=asdict(model_cfg))
    res = loop.run(loop.Task(name, model, step.opt, loss, evaluate), len(train), cfg.loop(), state_path, resume, run_id,
                   batches=step.feed.batches, dist=dist, on_epoch=on_epoch)
    if history_csv is not None and dist.is_main:
        write_history(res.history, history_csv, name)
    best_row = res.history[res.best_epoch - 1]
    return Checkpoint(
        name=name, arch=arch, config=model_cfg, spec=spec, state_dict=res.best,
        metrics={"best_epoch": res.best_epoch, "val_auc": best_row["val_auc"], "val_logloss": best_row["val_logloss"],
                 "select": cfg.select, "history": res.history,
                 "train_config": asdict(cfg), "processes": dist.world},
    )


def write_history(history: list[dict], path: Path, title: str) -> None:
    """Training curve as CSV plus a PNG beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    keys = list(history[0])
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    # Losses (train parts, val logloss) on the left, AUCs on the right: one plot for every trainer's history.
    for k in keys:
        if k.startswith("train_") or k.startswith("val_logloss"):
            ax1.plot(ep, [h[k] for h in history], "o-" if k.startswith("train_") else "s-", label=k.replace("_", " "))
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax2 = ax1.twinx()
    for k in keys:
        if k.startswith("val_auc"):
            ax2.plot(ep, [h[k] for h in history], "^--" if k != "val_auc" else "^-", label=k.replace("_", " "))
    ax2.set_ylabel("val AUC")
    fig.legend(loc="upper right", fontsize=8)
    ax1.set_title(f"{title} training curve")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    plt.close(fig)
