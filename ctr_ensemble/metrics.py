"""Quality of predicted click probabilities, tolerant of a single-class (or empty) sample.

AUC and logloss (scikit-learn, natural log), and what ads teams read beside them:

- **NE**, normalised entropy (He et al. 2014, "Practical lessons from predicting clicks on ads at
  Facebook"): logloss divided by the entropy of the base rate, which is the logloss of predicting
  the base rate for every row. Below 1 the model beats that constant; lower is better. The base
  rate is the *training* one (``fitted_on["label_mean"]`` of the feature spec) when known, so NEs
  of different samples share one reference; otherwise the sample's own (reports say which in
  ``ne_base``: ``"train"`` or ``"self"``).
- **calibration**: mean predicted CTR / observed CTR; 1 is calibrated, above 1 over-predicts.
- **ECE**, expected calibration error: ``sum_b n_b/n · |mean p_b − mean y_b|`` over ``bins``
  (default 10) *equal-frequency* bins of the predictions, the bins of scikit-learn's
  ``calibration_curve(strategy="quantile")``. Equal-frequency because CTRs crowd near 0, where
  equal-width bins would put nearly every row into the first bin.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

EPS = 1e-7
ECE_BINS = 10
# Two predictions of the same rows agree when no probability differs by more than this: ONNX Runtime vs PyTorch
# at export, the server vs the offline reference (evaluate, load tests, the demo's checks, check-export).
PARITY_TOL = 1e-5
QUALITY_KEYS = ("auc", "logloss", "ne", "ne_base", "calibration", "ece")


def _flat(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).ravel()


def auc(y: np.ndarray, p: np.ndarray) -> float | None:
    y = np.asarray(y).ravel()
    if not len(y) or y.min() == y.max():
        return None  # undefined with one class
    return float(roc_auc_score(y, _flat(p)))


def logloss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(_flat(p), EPS, 1 - EPS)
    return float(log_loss(np.asarray(y).ravel(), p, labels=[0, 1]))


def binary_entropy(rate: float) -> float:
    """Entropy in nats of a click with probability ``rate``: the logloss of predicting ``rate`` for
    every row of a sample whose CTR is ``rate``. 0 for a rate of 0 or 1 (or not a probability)."""
    r = float(rate)
    if not 0.0 < r < 1.0:
        return 0.0
    return -(r * math.log(r) + (1.0 - r) * math.log1p(-r))


def normalized_entropy(y: np.ndarray, p: np.ndarray, base_rate: float | None = None) -> float | None:
    """NE = logloss(y, p) / binary_entropy(base rate).

    ``base_rate``: the training CTR; None uses the mean of ``y``. None when that entropy is 0 (a
    base rate of 0 or 1, e.g. a one-class sample without a training rate) or ``y`` is empty."""
    y = _flat(y)
    if not len(y):
        return None
    h = binary_entropy(y.mean() if base_rate is None else base_rate)
    return logloss(y, p) / h if h > 0 else None


def calibration(y: np.ndarray, p: np.ndarray) -> float | None:
    """mean(p) / mean(y): predicted clicks per observed click. None without any positive."""
    y = _flat(y)
    if not len(y) or y.sum() == 0:
        return None
    return float(_flat(p).mean() / y.mean())


def calibration_bins(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per non-empty equal-frequency bin of ``p``: (rows, mean p, mean y). The bins are scikit-learn's
    ``calibration_curve(strategy="quantile")`` ones: edges at the p quantiles, a p on an edge in the
    lower bin; tied predictions can leave bins empty."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    y, p = _flat(y), _flat(p)
    edges = np.percentile(p, np.linspace(0, 100, bins + 1))
    ids = np.searchsorted(edges[1:-1], p)
    n = np.bincount(ids, minlength=bins)
    keep = n > 0
    mean_p = np.bincount(ids, weights=p, minlength=bins)[keep] / n[keep]
    mean_y = np.bincount(ids, weights=y, minlength=bins)[keep] / n[keep]
    return n[keep], mean_p, mean_y


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """ECE over ``bins`` equal-frequency bins (``calibration_bins``): the row-weighted mean of
    |mean p − mean y| per bin, 0 for a perfectly calibrated model. Defined for a one-class sample;
    None for an empty one."""
    if not len(_flat(y)):
        return None
    n, mean_p, mean_y = calibration_bins(y, p, bins)
    return float(np.sum(n * np.abs(mean_p - mean_y)) / n.sum())


def quality(y: np.ndarray, p: np.ndarray, train_base_rate: float | None = None, bins: int = ECE_BINS) -> dict:
    """Every metric above for one sample, keyed as the reports write them (``QUALITY_KEYS``).

    NE is against ``train_base_rate`` when given (``ne_base`` "train"), else the sample's own CTR
    ("self"). All None for an empty sample."""
    if not len(np.asarray(y).ravel()):
        return dict.fromkeys(QUALITY_KEYS)
    return {"auc": auc(y, p), "logloss": logloss(y, p), "ne": normalized_entropy(y, p, train_base_rate),
            "ne_base": "self" if train_base_rate is None else "train", "calibration": calibration(y, p),
            "ece": expected_calibration_error(y, p, bins)}
