"""Independent training of one member: BCE + Adam, early stopping on validation AUC (loop in ``loop.py``)."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ctr_ensemble import metrics, models
from ctr_ensemble.errors import CtrError
from ctr_ensemble.features import FeatureSpec, feed_rows
from ctr_ensemble.models.base import Member, MemberConfig
from ctr_ensemble.training import loop
from ctr_ensemble.training.checkpoint import Checkpoint
from ctr_ensemble.training.loop import LoopConfig


@dataclass
class Arrays:
    """Encoded rows held in memory: cat_ids (N, n_cat) int64, num (N, n_num) float32, label (N,) float32,
    and with a sequence field seq_ids (N, L) int64 + seq_len (N, 1) int64."""

    cat_ids: np.ndarray
    num: np.ndarray
    label: np.ndarray
    skipped: int = 0  # malformed rows skipped while reading (skip_bad_rows)
    seq_ids: np.ndarray | None = None
    seq_len: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.label)

    def feeds(self, rows: slice | np.ndarray = slice(None)) -> dict[str, np.ndarray]:
        """Model inputs by name for ``rows`` (what ONNX Runtime, Triton and ``predict`` take): ``num`` is
        left out without numeric fields, ``seq_ids``/``seq_len`` without a sequence field."""
        out = {"cat_ids": self.cat_ids[rows]}
        if self.num.shape[1]:
            out["num"] = self.num[rows]
        if self.seq_ids is not None:
            out["seq_ids"], out["seq_len"] = self.seq_ids[rows], self.seq_len[rows]
        return out

    def take(self, rows: slice | np.ndarray) -> "Arrays":
        """A subset of the rows (a view for a slice)."""
        seq = (None, None) if self.seq_ids is None else (self.seq_ids[rows], self.seq_len[rows])
        return Arrays(self.cat_ids[rows], self.num[rows], self.label[rows], self.skipped, *seq)


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 1e-4  # L2 through Adam; curbs memorisation of rare ids
    patience: int = 1  # epochs without a better validation AUC before stopping
    seed: int = 42
    eval_batch_size: int = 16384
    max_steps: int = 0  # stop after this many optimiser steps (0 = no limit); for smoke checks
    lr_decay: float = 1.0  # learning-rate factor per epoch, applied every step (1 = constant)
    save_every: int = 0  # optimiser steps between resume states (0 = at epoch ends only)

    def loop(self) -> LoopConfig:
        return LoopConfig(epochs=self.epochs, batch_size=self.batch_size, patience=self.patience, seed=self.seed,
                          max_steps=self.max_steps, lr_decay=self.lr_decay, save_every=self.save_every)


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


@torch.no_grad()
def predict(model: Member, feeds: dict[str, np.ndarray], batch_size: int = 16384) -> np.ndarray:
    """Click probabilities (N,) in float32 from a member in eval mode; ``feeds`` as ``Arrays.feeds()``."""
    return predict_outputs(model, feeds, batch_size)[0]


@torch.no_grad()
def predict_outputs(model: Member, feeds: dict[str, np.ndarray], batch_size: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Click probabilities (N,) and representations (N, H) in float32 from a member in eval mode."""
    model.eval()
    probs, reps = [], []
    for s in range(0, feed_rows(feeds), batch_size):
        p, h = model(**{k: torch.from_numpy(v[s : s + batch_size]) for k, v in feeds.items()})
        probs.append(p[:, 0].numpy())
        reps.append(h.numpy())
    if not probs:
        return np.zeros(0, np.float32), np.zeros((0, getattr(model, "repr_dim", 0)), np.float32)
    return np.concatenate(probs), np.concatenate(reps)


def val_metrics(y: np.ndarray, p: np.ndarray, suffix: str = "") -> dict[str, float]:
    """``val_auc`` and ``val_logloss`` (with an optional ``_suffix``); AUC 0 when undefined."""
    return {f"val_auc{suffix}": metrics.auc(y, p) or 0.0, f"val_logloss{suffix}": metrics.logloss(y, p)}


def unique_names(names: list[str]) -> list[str]:
    """Member names for an ensemble: repeats get ``_2``, ``_3``, … (``deepfm, deepfm`` → ``deepfm, deepfm_2``)."""
    count: dict[str, int] = {}
    out = []
    for n in names:
        count[n] = count.get(n, 0) + 1
        out.append(n if count[n] == 1 else f"{n}_{count[n]}")
    return out


def train_member(
    name: str,
    arch: str,
    model_cfg: MemberConfig,
    spec: FeatureSpec,
    train: Arrays,
    val: Arrays,
    cfg: TrainConfig,
    history_csv: Path | None = None,
    state_path: Path | None = None,
    resume: bool = False,
) -> Checkpoint:
    """Train a member from scratch and return the checkpoint of its best validation epoch."""
    torch.manual_seed(cfg.seed)
    model = models.build(arch, model_cfg, spec)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    rows = Rows(train)

    def loss(idx):
        x, y = rows.take(idx)
        logit, _ = model.logits(**x)
        value = loss_fn(logit[:, 0], y)
        return value, {"logloss": value}

    def evaluate():
        m = val_metrics(val.label, predict(model, val.feeds(), cfg.eval_batch_size))
        return m["val_auc"], m

    run_id = {"trainer": "member", "name": name, "arch": arch, "model_config": asdict(model_cfg),
              "spec": spec.fingerprint(), "train_rows": len(train), "train_config": asdict(cfg)}
    res = loop.run(loop.Task(name, model, opt, loss, evaluate), len(train), cfg.loop(), state_path, resume, run_id)
    if history_csv is not None:
        write_history(res.history, history_csv, name)
    return Checkpoint(
        name=name, arch=arch, config=model_cfg, spec=spec, state_dict=res.best,
        metrics={"best_epoch": res.best_epoch, "val_auc": res.best_score, "history": res.history, "train_config": asdict(cfg)},
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


def encode_file(path: str | Path, spec: FeatureSpec, skip_bad_rows: bool = False, fmt: str = "auto") -> Arrays:
    """Read and encode a whole file (any supported format) into memory."""
    from ctr_ensemble.data.readers import open_reader
    from ctr_ensemble.features import Encoder

    reader = open_reader(path, fmt, skip_bad_rows)
    enc = Encoder(spec)
    enc.check_fields(reader, str(path))
    parts = []
    for b in reader:
        seq = enc.encode_sequence(b.seq) if spec.sequence is not None else ()
        parts.append((*enc.encode(b), b.label, *seq))
    if not parts:
        raise CtrError(f"{path}: no valid rows")
    cols = [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
    cols[2] = cols[2].astype(np.float32)
    return Arrays(*cols[:3], reader.stats.skipped, *cols[3:])
