"""From what the Locust users recorded to the figures of one run, and the Pareto front of a sweep."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ctr_ensemble import metrics
from ctr_ensemble.errors import CtrError

FIELDS = ("t_start", "latency_ms", "row_start", "n_rows", "ok", "error", "pred", "label")


def load_results(results_dir: Path) -> dict[str, np.ndarray]:
    """Concatenate every ``results-*.npz`` a Locust process wrote (one per worker)."""
    files = sorted(Path(results_dir).glob("results-*.npz"))
    parts = {k: [] for k in FIELDS}
    for f in files:
        with np.load(f) as d:
            for k in FIELDS:
                parts[k].append(d[k])
    if not files:
        return {k: np.zeros(0) for k in FIELDS} | {"error": np.zeros(0, dtype=str), "ok": np.zeros(0, bool)}
    return {k: np.concatenate(v) for k, v in parts.items()}


def summarize(res: dict[str, np.ndarray], labels: np.ndarray, offline: np.ndarray, warmup_s: float,
              tol: float = metrics.PARITY_TOL, train_base_rate: float | None = None) -> dict:
    """Throughput and latency over the steady-state window, errors by kind, served vs offline quality.

    Steady state: requests sent at least ``warmup_s`` after the first one; the window ends when the
    last of them came back. Latency percentiles are over successful steady-state requests. AUC,
    logloss, NE, calibration and ECE (``metrics.quality``; NE against ``train_base_rate`` when given,
    else the rows' own CTR: ``ne_base``) are over the distinct rows served (warm-up included;
    ``coverage`` = their share of the rows file), as ``served_*`` beside ``offline_*`` of the offline
    predictions of the very same rows; every served copy is checked: a request with any row further
    than ``tol`` from offline is a ``mismatch`` error.
    """
    n_req = len(res["t_start"])
    ok = res["ok"].astype(bool)
    kinds = Counter(str(e) for e in res["error"][~ok])
    out: dict = {"requests": int(n_req), "failed": int((~ok).sum())}
    # Rows of each successful request, in recorded order (the order the predictions were appended).
    n = len(labels)
    starts, sizes = res["row_start"][ok].astype(np.int64), res["n_rows"][ok].astype(np.int64)
    idx = (np.repeat(starts, sizes) + _ranges(sizes)) % n if len(starts) else np.zeros(0, np.int64)
    pred = res["pred"].astype(np.float64)
    if len(pred) != len(idx):
        raise CtrError(f"results hold {len(pred)} predictions for {len(idx)} rows sent; the run's files are inconsistent")
    if len(idx) and not np.array_equal(res["label"], labels[idx]):
        raise CtrError("recorded labels differ from the rows file: results and rows belong to different runs")
    diff = np.abs(pred - offline[idx]) if len(idx) else np.zeros(0)
    bad_rows = ~(diff <= tol)  # NaN counts as a mismatch
    req_of_row = np.repeat(np.arange(len(starts)), sizes)
    mismatched = int(len(np.unique(req_of_row[bad_rows]))) if bad_rows.any() else 0
    if mismatched:
        kinds["mismatch"] += mismatched
    out.update(errors=int(out["failed"] + mismatched), mismatched_requests=mismatched,
               mismatched_rows=int(bad_rows.sum()), max_abs_diff=float(diff.max()) if len(diff) else float("nan"),
               errors_by_kind=dict(sorted(kinds.items())), rows_served=int(len(idx)))
    # Quality over the distinct rows served (the first answer for each): runs that covered every
    # row are scored on the same rows, so their AUCs compare models, not samples.
    rows_seen, first = np.unique(idx, return_index=True)
    y, p_served, p_off = labels[rows_seen], pred[first], offline[rows_seen]
    out["coverage"] = len(rows_seen) / n if n else 0.0
    for who, p in (("served", p_served), ("offline", p_off)):
        q = metrics.quality(y, p, train_base_rate)
        out["ne_base"] = q.pop("ne_base")
        out.update({f"{who}_{k}": v for k, v in q.items()})
    out.update(steady_state(res, warmup_s))
    return out


def _ranges(sizes: np.ndarray) -> np.ndarray:
    """[0..s0-1, 0..s1-1, ...] without a Python loop."""
    ends = np.cumsum(sizes)
    return np.arange(ends[-1]) - np.repeat(ends - sizes, sizes)


def steady_state(res: dict[str, np.ndarray], warmup_s: float) -> dict:
    ok = res["ok"].astype(bool)
    t0 = res["t_start"]
    if not len(t0):
        return {"steady_requests": 0, "window_s": 0.0, "rps": 0.0, "rows_per_s": 0.0,
                **{k: float("nan") for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")}}
    start = t0.min() + warmup_s
    steady = t0 >= start
    if not (steady & ok).any():  # run shorter than the warm-up: report over everything, say so
        steady, start = np.ones_like(steady), t0.min()
    t_end = t0 + res["latency_ms"] / 1e3
    window = float(t_end[steady].max() - start)
    good = steady & ok
    lat = res["latency_ms"][good]
    pct = np.percentile(lat, [50, 95, 99]) if len(lat) else [float("nan")] * 3
    return {
        "steady_requests": int(good.sum()), "window_s": window,
        "rps": good.sum() / window if window > 0 else 0.0,
        "rows_per_s": res["n_rows"][good].sum() / window if window > 0 else 0.0,
        "p50_ms": float(pct[0]), "p95_ms": float(pct[1]), "p99_ms": float(pct[2]),
        "max_ms": float(lat.max()) if len(lat) else float("nan"),
    }


def pareto_front(latency: list[float], quality: list[float | None]) -> list[bool]:
    """True where no other point is at least as fast and at least as good, and strictly better in one.

    Lower latency is better, higher quality (AUC) is better; points without a quality or a finite
    latency are never on the front.
    """
    pts = [(float(l), float(q)) if q is not None and np.isfinite(l) and np.isfinite(q) else None
           for l, q in zip(latency, quality)]
    front = []
    for i, p in enumerate(pts):
        if p is None:
            front.append(False)
            continue
        dominated = any(o is not None and j != i and o[0] <= p[0] and o[1] >= p[1] and (o[0] < p[0] or o[1] > p[1])
                        for j, o in enumerate(pts))
        front.append(not dominated)
    return front
