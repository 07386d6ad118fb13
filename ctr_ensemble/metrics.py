"""AUC and logloss (scikit-learn), tolerant of a single-class sample."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

EPS = 1e-7


def auc(y: np.ndarray, p: np.ndarray) -> float | None:
    y = np.asarray(y).ravel()
    if y.min() == y.max():
        return None  # undefined with one class
    return float(roc_auc_score(y, np.asarray(p, dtype=np.float64).ravel()))


def logloss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64).ravel(), EPS, 1 - EPS)
    return float(log_loss(np.asarray(y).ravel(), p, labels=[0, 1]))
