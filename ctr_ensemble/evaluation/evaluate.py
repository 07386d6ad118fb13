"""Score one labelled file through PyTorch, ONNX Runtime, Triton HTTP and Triton gRPC.

For each member and for the ensemble, and for each backend: AUC, logloss, NE (normalised
entropy, against the training base rate the repository's feature spec records, else the scored
file's own: ``ne_base``), calibration (mean p / CTR), ECE (``ctr_ensemble.metrics``), rows/s and the
max absolute difference against the reference: the member's PyTorch output, or for the
ensemble the reference fusion (``layers.fusion``) of the members' PyTorch outputs (for a
collaborative repository: the trained head over the members' PyTorch probs and reprs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctr_ensemble import metrics
from ctr_ensemble.data.encode import encode_file
from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import onnx_export
from ctr_ensemble.export.repository import ENSEMBLE_NAME, fuse_collaborative, manifest_rule, read_manifest, repository_spec
from ctr_ensemble.layers.fusion import COLLABORATIVE
from ctr_ensemble.models import checkpoint, ensemble
from ctr_ensemble.models.predict import predict_outputs
from ctr_ensemble.serving.client import TritonScorer

BACKENDS = ("torch", "onnx", "triton_http", "triton_grpc")


@dataclass
class EvalTargets:
    http_url: str | None = None
    grpc_url: str | None = None
    batch_size: int = 1024


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


class _Reference:
    """The members' PyTorch models and the fusion the repository serves, as numpy functions.

    mean / negation_entropy / fitted: the reference fusion of member probabilities; collaborative: the
    collaborative checkpoint's head applied to member probabilities and representations."""

    def __init__(self, manifest: dict, names: list[str], overrides: dict[str, str]):
        fusion = manifest["fusion"]
        self.needs_repr = fusion["mode"] == COLLABORATIVE
        if self.needs_repr:
            path = overrides.get("collab", fusion.get("checkpoint"))
            if not path:
                raise CtrError("collaborative repository without a known checkpoint; pass --checkpoint collab=PATH")
            cc = ensemble.load(path)
            if cc.names != names:
                raise CtrError(f"{path}: members {cc.names} do not match the repository's {names}")
            self.head = cc.build().head
            self.members = {m.name: m.build() for m in cc.members}
            return
        self.rule = manifest_rule(manifest)
        paths = {n: overrides.get(n, manifest["members"][n].get("checkpoint")) for n in names}
        for n, path in paths.items():
            if not path:
                raise CtrError(f"member {n}: no checkpoint known; pass --checkpoint {n}=PATH")
        self.members = {n: checkpoint.load(path).build() for n, path in paths.items()}

    def fuse(self, names: list[str], probs: dict[str, np.ndarray], reprs: dict[str, np.ndarray] | None) -> np.ndarray:
        if self.needs_repr:
            return fuse_collaborative(self.head, [probs[n] for n in names], [reprs[n] for n in names])[0]
        stacked = torch.from_numpy(np.stack([probs[n] for n in names], axis=1).astype(np.float32))
        return self.rule.fuse(stacked)[0][:, 0].numpy()


def _row(y: np.ndarray, p: np.ndarray, ref: np.ndarray | None, seconds: float | None, base_rate: float | None) -> dict:
    return {
        **metrics.quality(y, p, base_rate),
        "max_abs_diff": float(np.max(np.abs(p.astype(np.float64) - ref))) if ref is not None and len(p) else None,
        "rows_per_s": len(p) / seconds if seconds else None,
    }


def evaluate(
    data: str | Path,
    repository: str | Path,
    backends: list[str],
    targets: EvalTargets,
    truth: str | Path | None = None,
    checkpoints: dict[str, str] | None = None,
    skip_bad_rows: bool = False,
    fmt: str = "auto",
) -> dict:
    """Return the summary dict (see module doc); ``oracle_auc`` when the true p is given."""
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise CtrError(f"unknown backends {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    repository = Path(repository)
    manifest = read_manifest(repository)
    names = list(manifest["members"])
    mode, tau = manifest["fusion"]["mode"], float(manifest["fusion"]["tau"])
    spec = repository_spec(repository)
    arr = encode_file(data, spec, skip_bad_rows, fmt)
    feeds, y = arr.feeds(), arr.label.astype(np.int64)
    base = spec.fitted_on.get("label_mean")  # the training CTR; older specs do not record it
    summary: dict = {"data": str(data), "rows": int(len(y)), "skipped_rows": arr.skipped, "oracle_auc": None,
                     "base_rate": {"train": base, "self": float(y.mean()) if len(y) else None},
                     "fusion": {"mode": mode, "tau": tau, **{k: manifest["fusion"][k] for k in ("priors", "space") if k in manifest["fusion"]}},
                     "members": {n: {} for n in names}, "ensemble": {}}
    if truth is not None:
        p_true = np.load(truth)
        if len(p_true) != len(y):
            raise CtrError(f"{truth}: has {len(p_true)} probabilities but {data} has {len(y)} rows")
        summary["oracle_auc"] = metrics.auc(y, p_true)

    # The PyTorch member outputs are the reference for everything else.
    reference = _Reference(manifest, names, dict(checkpoints or {}))
    ref: dict[str, np.ndarray] = {}
    ref_repr: dict[str, np.ndarray] = {}
    for n in names:
        model = reference.members[n]
        (ref[n], h), sec = _timed(lambda: predict_outputs(model, feeds))
        ref[n] = ref[n].astype(np.float64)
        if reference.needs_repr:  # (N, H) per member: kept only where the fusion uses it
            ref_repr[n] = h
        if "torch" in backends:
            summary["members"][n]["torch"] = _row(y, ref[n], ref[n], sec, base)
    ref_fused = reference.fuse(names, ref, ref_repr).astype(np.float64)
    if "torch" in backends:
        summary["ensemble"]["torch"] = _row(y, ref_fused, ref_fused, None, base)

    if "onnx" in backends:
        probs, reprs = {}, {}
        for n in names:
            sess = onnx_export.session(repository / n / "1" / "model.onnx")
            (probs[n], h), sec = _timed(lambda: onnx_export.run_onnx(sess, feeds))
            reprs[n] = h if reference.needs_repr else None
            summary["members"][n]["onnx"] = _row(y, probs[n], ref[n], sec, base)
        summary["ensemble"]["onnx"] = _row(y, reference.fuse(names, probs, reprs), ref_fused, None, base)

    outputs = ("prob", "repr") if reference.needs_repr else ("prob",)
    for backend, protocol, url in (("triton_http", "http", targets.http_url), ("triton_grpc", "grpc", targets.grpc_url)):
        if backend not in backends:
            continue
        if not url:
            raise CtrError(f"backend {backend} needs a server URL (--{protocol}-url) or --start-server")
        scorer = TritonScorer(url, protocol)
        scorer.check_ready(ENSEMBLE_NAME)
        probs, reprs = {}, {}
        for n in names:
            out, sec = _timed(lambda: scorer.score_outputs(n, feeds, targets.batch_size, outputs))
            probs[n], reprs[n] = out["prob"][:, 0], out.get("repr")
            summary["members"][n][backend] = _row(y, probs[n], ref[n], sec, base)
        served, sec = _timed(lambda: scorer.score(ENSEMBLE_NAME, feeds, targets.batch_size))
        row = _row(y, served, ref_fused, sec, base)
        # The server's fusion against the reference fusion of what the same server's members returned.
        row["fusion_max_abs_diff"] = float(np.max(np.abs(served - reference.fuse(names, probs, reprs))))
        summary["ensemble"][backend] = row
        scorer.close()
    return summary


def render_table(summary: dict) -> "rich.table.Table":  # noqa: F821
    from rich.table import Table

    oracle = summary.get("oracle_auc")
    title = f"{summary['rows']} rows of {Path(summary['data']).name}" + (f" · oracle AUC {oracle:.4f}" if oracle else "")
    train_rate = summary.get("base_rate", {}).get("train")
    caption = (f"NE vs the training CTR {train_rate:.4f}" if train_rate is not None else "NE vs this file's own CTR "
               "(the feature spec records no training CTR)") + f"; ECE over {metrics.ECE_BINS} equal-frequency bins"
    table = Table(title=title, caption=caption)
    for col in ("model", "backend", "AUC", "logloss", "NE", "calibration", "ECE", "max |Δ| vs ref", "rows/s"):
        table.add_column(col, justify="right" if col not in ("model", "backend") else "left")
    models = [(n, r) for n, r in summary["members"].items()] + [(f"{ENSEMBLE_NAME} ({summary['fusion']['mode']})", summary["ensemble"])]
    for name, rows in models:
        for backend, r in rows.items():
            table.add_row(
                name, backend,
                f"{r['auc']:.4f}" if r["auc"] is not None else "n/a",
                f"{r['logloss']:.4f}",
                *(f"{r.get(k):.4f}" if r.get(k) is not None else "n/a" for k in ("ne", "calibration", "ece")),
                f"{r['max_abs_diff']:.2e}" if r["max_abs_diff"] is not None else "-",
                f"{r['rows_per_s']:,.0f}" if r.get("rows_per_s") else "-",
            )
    return table
