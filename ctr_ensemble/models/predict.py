"""Offline scoring of a member from numpy feeds (model inputs by name, as ``Arrays.feeds()`` gives them)."""

from __future__ import annotations

import numpy as np
import torch

from ctr_ensemble.data.spec import feed_rows
from ctr_ensemble.models.base import Member


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
