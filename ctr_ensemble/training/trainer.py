"""Independent training of one member: BCE + Adam, early stopping on validation AUC."""

from __future__ import annotations

import copy
import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ctr_ensemble import metrics, models
from ctr_ensemble.errors import CtrError
from ctr_ensemble.features import FeatureSpec, feed_rows
from ctr_ensemble.models.base import Member, MemberConfig
from ctr_ensemble.training.checkpoint import Checkpoint


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


@torch.no_grad()
def predict(model: Member, feeds: dict[str, np.ndarray], batch_size: int = 16384) -> np.ndarray:
    """Click probabilities (N,) in float32 from a member in eval mode; ``feeds`` as ``Arrays.feeds()``."""
    model.eval()
    out = []
    for s in range(0, feed_rows(feeds), batch_size):
        p, _ = model(**{k: torch.from_numpy(v[s : s + batch_size]) for k, v in feeds.items()})
        out.append(p[:, 0].numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def train_member(
    name: str,
    arch: str,
    model_cfg: MemberConfig,
    spec: FeatureSpec,
    train: Arrays,
    val: Arrays,
    cfg: TrainConfig,
    history_csv: Path | None = None,
) -> Checkpoint:
    """Train a member from scratch and return the checkpoint of its best validation epoch."""
    torch.manual_seed(cfg.seed)
    model = models.build(arch, model_cfg, spec)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(cfg.seed)
    inputs = [torch.from_numpy(train.cat_ids), torch.from_numpy(train.num)]
    if train.seq_ids is not None:
        inputs += [torch.from_numpy(train.seq_ids), torch.from_numpy(train.seq_len)]
    y_t = torch.from_numpy(train.label.astype(np.float32))
    best_auc, best_state, best_epoch, bad_epochs = -1.0, None, 0, 0
    history = []
    steps = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(train), generator=gen)
        total, seen = 0.0, 0
        bar = tqdm(range(0, len(train), cfg.batch_size), desc=f"{name} epoch {epoch}/{cfg.epochs}", unit="batch", leave=False)
        for s in bar:
            idx = order[s : s + cfg.batch_size]
            logit, _ = model.logits(*(t[idx] for t in inputs))
            loss = loss_fn(logit[:, 0], y_t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
            steps += 1
            if cfg.max_steps and steps >= cfg.max_steps:
                break
        p_val = predict(model, val.feeds(), cfg.eval_batch_size)
        val_auc = metrics.auc(val.label, p_val) or 0.0
        row = {
            "epoch": epoch,
            "train_logloss": total / max(seen, 1),
            "val_auc": val_auc,
            "val_logloss": metrics.logloss(val.label, p_val),
            "seconds": time.perf_counter() - t0,
        }
        history.append(row)
        tqdm.write(f"{name} epoch {epoch}: train_logloss={row['train_logloss']:.4f} val_auc={val_auc:.4f} "
                   f"val_logloss={row['val_logloss']:.4f} ({row['seconds']:.1f}s)")
        if val_auc > best_auc or best_state is None:
            best_auc, best_epoch, bad_epochs = val_auc, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
            if bad_epochs > cfg.patience:
                tqdm.write(f"{name}: early stop, best val_auc={best_auc:.4f} at epoch {best_epoch}")
                break
        if cfg.max_steps and steps >= cfg.max_steps:
            break
    if history_csv is not None:
        write_history(history, history_csv, name)
    return Checkpoint(
        name=name, arch=arch, config=model_cfg, spec=spec, state_dict=best_state,
        metrics={"best_epoch": best_epoch, "val_auc": best_auc, "history": history, "train_config": asdict(cfg)},
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
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    ax1.plot(ep, [h["train_logloss"] for h in history], "o-", label="train logloss")
    ax1.plot(ep, [h["val_logloss"] for h in history], "s-", label="val logloss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("logloss")
    ax2 = ax1.twinx()
    ax2.plot(ep, [h["val_auc"] for h in history], "^-", color="tab:green", label="val AUC")
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
