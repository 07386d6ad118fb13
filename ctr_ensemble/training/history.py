"""A run's training curve: the per-epoch history as CSV with a PNG beside it."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ctr_ensemble.files import write_atomic


def write_history(history: list[dict], path: Path, title: str) -> None:
    """Training curve as CSV plus a PNG beside it."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(history[0]))
    w.writeheader()
    w.writerows(history)
    write_atomic(path, buf.getvalue().encode(), what="training history")  # the record of a run: durable
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
