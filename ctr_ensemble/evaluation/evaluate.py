"""Score one labelled file through PyTorch, ONNX Runtime, Triton HTTP and Triton gRPC.

For each member and for the ensemble, and for each backend: AUC, logloss, rows/s and the
max absolute difference against the reference: the member's PyTorch output, or for the
ensemble the reference fusion (``layers.fusion``) of the members' PyTorch outputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ctr_ensemble import metrics
from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import onnx_export
from ctr_ensemble.export.repository import ENSEMBLE_NAME, read_manifest, repository_spec
from ctr_ensemble.layers.fusion import fuse
from ctr_ensemble.serving.client import TritonScorer
from ctr_ensemble.training import checkpoint
from ctr_ensemble.training.trainer import encode_file, predict

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


def _fuse_np(probs: dict[str, np.ndarray], names: list[str], mode: str, tau: float) -> np.ndarray:
    stacked = torch.from_numpy(np.stack([probs[n] for n in names], axis=1).astype(np.float32))
    return fuse(stacked, mode, tau)[0][:, 0].numpy()


def _row(y: np.ndarray, p: np.ndarray, ref: np.ndarray | None, seconds: float | None) -> dict:
    return {
        "auc": metrics.auc(y, p),
        "logloss": metrics.logloss(y, p),
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
    summary: dict = {"data": str(data), "rows": int(len(y)), "skipped_rows": arr.skipped, "oracle_auc": None,
                     "fusion": {"mode": mode, "tau": tau}, "members": {n: {} for n in names}, "ensemble": {}}
    if truth is not None:
        p_true = np.load(truth)
        if len(p_true) != len(y):
            raise CtrError(f"{truth}: has {len(p_true)} probabilities but {data} has {len(y)} rows")
        summary["oracle_auc"] = metrics.auc(y, p_true)

    # The PyTorch member outputs are the reference for everything else.
    ckpt_paths = dict(checkpoints or {})
    for n in names:
        ckpt_paths.setdefault(n, manifest["members"][n].get("checkpoint"))
    ref: dict[str, np.ndarray] = {}
    for n in names:
        if not ckpt_paths.get(n):
            raise CtrError(f"member {n}: no checkpoint known; pass --checkpoint {n}=PATH")
        model = checkpoint.load(ckpt_paths[n]).build()
        ref[n], sec = _timed(lambda: predict(model, feeds))
        ref[n] = ref[n].astype(np.float64)
        if "torch" in backends:
            summary["members"][n]["torch"] = _row(y, ref[n], ref[n], sec)
    ref_fused = _fuse_np(ref, names, mode, tau).astype(np.float64)
    if "torch" in backends:
        summary["ensemble"]["torch"] = _row(y, ref_fused, ref_fused, None)

    if "onnx" in backends:
        probs = {}
        for n in names:
            sess = onnx_export.session(repository / n / "1" / "model.onnx")
            (probs[n], _), sec = _timed(lambda: onnx_export.run_onnx(sess, feeds))
            summary["members"][n]["onnx"] = _row(y, probs[n], ref[n], sec)
        summary["ensemble"]["onnx"] = _row(y, _fuse_np(probs, names, mode, tau), ref_fused, None)

    for backend, protocol, url in (("triton_http", "http", targets.http_url), ("triton_grpc", "grpc", targets.grpc_url)):
        if backend not in backends:
            continue
        if not url:
            raise CtrError(f"backend {backend} needs a server URL (--{protocol}-url) or --start-server")
        scorer = TritonScorer(url, protocol)
        scorer.check_ready(ENSEMBLE_NAME)
        probs = {}
        for n in names:
            probs[n], sec = _timed(lambda: scorer.score(n, feeds, targets.batch_size))
            summary["members"][n][backend] = _row(y, probs[n], ref[n], sec)
        served, sec = _timed(lambda: scorer.score(ENSEMBLE_NAME, feeds, targets.batch_size))
        row = _row(y, served, ref_fused, sec)
        # The server's fusion against the reference fusion of what the same server's members returned.
        row["fusion_max_abs_diff"] = float(np.max(np.abs(served - _fuse_np(probs, names, mode, tau))))
        summary["ensemble"][backend] = row
        scorer.close()
    return summary


def render_table(summary: dict) -> "rich.table.Table":  # noqa: F821
    from rich.table import Table

    oracle = summary.get("oracle_auc")
    title = f"{summary['rows']} rows of {Path(summary['data']).name}" + (f" · oracle AUC {oracle:.4f}" if oracle else "")
    table = Table(title=title)
    for col in ("model", "backend", "AUC", "logloss", "max |Δ| vs ref", "rows/s"):
        table.add_column(col, justify="right" if col not in ("model", "backend") else "left")
    models = [(n, r) for n, r in summary["members"].items()] + [(f"{ENSEMBLE_NAME} ({summary['fusion']['mode']})", summary["ensemble"])]
    for name, rows in models:
        for backend, r in rows.items():
            table.add_row(
                name, backend,
                f"{r['auc']:.4f}" if r["auc"] is not None else "n/a",
                f"{r['logloss']:.4f}",
                f"{r['max_abs_diff']:.2e}" if r["max_abs_diff"] is not None else "-",
                f"{r['rows_per_s']:,.0f}" if r.get("rows_per_s") else "-",
            )
    return table
