"""Fit the fusion rule on validation data (``ctr-ensemble export --fit-fusion VAL_FILE``).

The family is ``layers.fusion``'s ``fitted`` rule: w = softmax(a_i + NE(p_i)/τ) per row, averaged
in probability space (Σ w_i·p_i) or logit space (σ(Σ w_i·logit p_i)). For each space asked for
(``prob``, ``logit``, or ``auto`` = both), log τ and the priors a_i minimise the validation logloss
(L-BFGS in float64 from a few starting τ). The rule kept is then the candidate with the lowest
validation logloss *as the server computes it* (float32, ``FusionRule.fuse``) among: the optimised
rules, negation entropy τ = 1, the mean, and each member alone (a one-hot weight: prior 0 for it,
``ONE_HOT_PRIOR`` for the others; the fused output is then that member's probability bit for bit).
Each member alone is in the family and among the candidates, so on validation the fitted rule is
never worse in logloss than the best member.

``report`` scores the fitted rule, τ = 1, the mean and every member on validation (and on a test
split when given): AUC, logloss and calibration (mean predicted / observed CTR).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch.nn import functional as F

from ctr_ensemble import metrics
from ctr_ensemble.errors import CtrError
from ctr_ensemble.layers.fusion import EPS, FITTED, SPACES, FusionRule, negation_entropy
from ctr_ensemble.models.predict import predict

ONE_HOT_PRIOR = -1e4  # exp(-1e4 + NE/τ) is 0 in float32 for any τ the fit allows: a one-hot weight
MEAN_TAU = 1e9  # NE/τ below float32 resolution: every weight exactly 1/N
TAU_BOUNDS = (1e-3, 1e4)
TAU_STARTS = (1.0, 0.1, 10.0)
BASELINES = {"negation_entropy τ=1": FusionRule("negation_entropy", 1.0), "mean": FusionRule("mean")}


def spaces_for(space: str) -> tuple[str, ...]:
    if space == "auto":
        return SPACES
    if space not in SPACES:
        raise CtrError(f"--fusion-space must be prob, logit or auto, got {space!r}")
    return (space,)


def fused(rule: FusionRule, probs: np.ndarray) -> np.ndarray:
    """(N,) float32 predictions of ``rule`` on member probabilities (N, M), as the server computes them."""
    with torch.no_grad():
        return rule.fuse(torch.from_numpy(np.ascontiguousarray(probs, dtype=np.float32)))[0][:, 0].numpy()


def quality(y: np.ndarray, p: np.ndarray) -> dict:
    return {"auc": metrics.auc(y, p), "logloss": metrics.logloss(y, p), "calibration": metrics.calibration(y, p)}


def _optimise(probs: np.ndarray, y: np.ndarray, space: str, tau0: float, max_iter: int = 200) -> FusionRule:
    """log τ and priors minimising the mean BCE of the rule in ``space`` (float64, L-BFGS)."""
    p = torch.from_numpy(probs.astype(np.float64))
    t = torch.from_numpy(y.astype(np.float64))
    ne = negation_entropy(p)
    z = torch.logit(p.clamp(EPS, 1 - EPS))
    lo, hi = (math.log(b) for b in TAU_BOUNDS)
    log_tau = torch.tensor(math.log(tau0), dtype=torch.float64, requires_grad=True)
    priors = torch.zeros(p.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_tau, priors], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-14)

    def loss() -> torch.Tensor:
        w = torch.softmax(priors + ne / log_tau.clamp(lo, hi).exp(), dim=1)
        if space == "logit":
            return F.binary_cross_entropy_with_logits((w * z).sum(1), t)
        return F.binary_cross_entropy((w * p).sum(1).clamp(EPS, 1 - EPS), t)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    opt.step(closure)
    a = priors.detach()
    a = (a - a.max()).clamp(min=ONE_HOT_PRIOR)  # softmax is shift-invariant: the favoured member gets 0
    return FusionRule(FITTED, float(log_tau.detach().clamp(lo, hi).exp()), a.tolist(), space)


def candidates(names: list[str], probs: np.ndarray, y: np.ndarray, space: str = "auto") -> list[tuple[str, FusionRule]]:
    """(label, rule) for every rule the fit chooses among, all in the ``fitted`` family."""
    m = len(names)
    out = []
    for s in spaces_for(space):
        best = min((_optimise(probs, y, s, tau0) for tau0 in TAU_STARTS),
                   key=lambda r: metrics.logloss(y, fused(r, probs)))
        out.append((f"optimised ({s} space)", best))
    out.append(("negation_entropy τ=1", FusionRule(FITTED, 1.0, [0.0] * m, "prob")))
    out.append(("mean", FusionRule(FITTED, MEAN_TAU, [0.0] * m, "prob")))
    for k, name in enumerate(names):
        out.append((f"member {name} alone", FusionRule(FITTED, 1.0, [0.0 if j == k else ONE_HOT_PRIOR for j in range(m)], "prob")))
    return out


@contextlib.contextmanager
def _one_thread():
    """(N, M) numbers: intra-op threads only spin against each other (measured 30x slower with 2 on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit(names: list[str], probs: np.ndarray, y: np.ndarray, space: str = "auto") -> tuple[FusionRule, dict]:
    """The fitted rule for member probabilities ``probs`` (N, M) and labels ``y`` (N,), and the record of the
    choice: every candidate with its validation logloss, the one kept (lowest; the first on a tie)."""
    probs = np.ascontiguousarray(probs, dtype=np.float32)
    if probs.ndim != 2 or probs.shape[1] != len(names) or len(y) != len(probs):
        raise CtrError(f"fusion fit: member probabilities {probs.shape} do not match {len(names)} members and {len(y)} labels")
    if len(y) == 0 or np.min(y) == np.max(y):
        raise CtrError("fusion fit: the validation rows need both clicks and non-clicks")
    with _one_thread():
        scored = [(label, rule, metrics.logloss(y, fused(rule, probs))) for label, rule in candidates(names, probs, y, space)]
    label, rule, ll = min(scored, key=lambda c: c[2])
    record = {"rule": rule.entry(), "space_asked": space, "rows": int(len(y)), "chosen": label, "val_logloss": ll,
              "candidates": [{"name": n, **r.entry(), "val_logloss": v} for n, r, v in scored]}
    return rule, record


def report(names: list[str], rule: FusionRule, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """AUC, logloss and calibration per split (``{"val": (probs, y), "test": ...}``) for the fitted rule, τ = 1,
    the mean and each member; ``best_member``: the member with the lowest validation logloss."""
    rules = {"fitted": rule, **BASELINES}
    rows = []
    for label, r in rules.items():
        rows.append({"name": label, "rule": r.describe(), **{s: quality(y, fused(r, p)) for s, (p, y) in splits.items()}})
    for k, name in enumerate(names):
        rows.append({"name": name, "rule": "member", **{s: quality(y, p[:, k]) for s, (p, y) in splits.items()}})
    members = rows[len(rules):]
    best = min(members, key=lambda r: r["val"]["logloss"])
    best["rule"] = "best member"
    return {"splits": {s: int(len(y)) for s, (_, y) in splits.items()}, "best_member": best["name"], "rows": rows}


def render(rep: dict) -> str:
    """The report as a Markdown table."""
    splits = list(rep["splits"])
    cols = ["fusion", ""] + [f"{s} {k}" for s in splits for k in ("AUC", "logloss", "calibration")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rep["rows"]:
        cells = [r["name"], r["rule"]]
        for s in splits:
            q = r[s]
            cells += [f"{q['auc']:.4f}" if q["auc"] is not None else "n/a", f"{q['logloss']:.4f}",
                      f"{q['calibration']:.4f}" if q["calibration"] is not None else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    rows = ", ".join(f"{s} {n:,} rows" for s, n in rep["splits"].items())
    return "\n".join(lines) + f"\n({rows}; calibration = mean predicted / observed CTR)"


def member_probs(checkpoints, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """(N, M) float32 PyTorch probabilities of the members (eval mode) on ``feeds``."""
    return np.stack([predict(ck.build(), feeds) for ck in checkpoints], axis=1).astype(np.float32)


def fit_for_export(checkpoints, val, test=None, space: str = "auto", sources: dict | None = None) -> tuple[FusionRule, dict]:
    """Score ``val`` (and ``test``: encoded ``Arrays``) with the members, fit on ``val``; the rule and the
    record that goes into repository.json (``fusion.fit``): the choice, its candidates and the report.
    ``sources``: where ``val``/``test`` were read from (``export --fit-fusion`` encodes the files with the
    members' feature spec), kept in the record as ``val_data``/``test_data``."""
    names = [c.name for c in checkpoints]
    splits = {"val": (member_probs(checkpoints, val.feeds()), val.label.astype(np.int64))}
    if test is not None:
        splits["test"] = (member_probs(checkpoints, test.feeds()), test.label.astype(np.int64))
    rule, record = fit(names, *splits["val"], space=space)
    record["report"] = report(names, rule, splits)
    record.update({f"{k}_data": str(v) for k, v in (sources or {}).items() if v is not None})
    return rule, record


def fit_files(checkpoints, val_path, test_path=None, space: str = "auto", fmt: str = "auto") -> tuple[FusionRule, dict]:
    """``fit_for_export`` on raw labelled files, encoded with the members' feature spec."""
    from ctr_ensemble.data.encode import encode_file

    spaces_for(space)  # a wrong --fusion-space fails before any file is read
    spec = checkpoints[0].spec
    val = encode_file(val_path, spec, fmt=fmt)
    test = encode_file(test_path, spec, fmt=fmt) if test_path is not None else None
    return fit_for_export(checkpoints, val, test, space, sources={"val": val_path, "test": test_path})
