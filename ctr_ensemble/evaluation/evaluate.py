"""Score one labelled file through PyTorch, ONNX Runtime, Triton HTTP and Triton gRPC.

For each member and for the ensemble, and for each backend: AUC, logloss, NE (normalised
entropy, against the training base rate the repository's feature spec records, else the scored
file's own: ``ne_base``), calibration (mean p / CTR), ECE (``ctr_ensemble.metrics``), rows/s and the
max absolute difference against the reference (``export.reference``): the member's PyTorch output, or for
the ensemble the fusion as served (the fusion model's rule and parameters, or for a collaborative
repository its trained head) over the members' PyTorch outputs (probs, and reprs for the head).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctr_ensemble import metrics
from ctr_ensemble.data.encode import encode_file
from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import onnx_export, reference
from ctr_ensemble.export.repository import ENSEMBLE_NAME, FUSION_NAME, read_config, read_manifest, repository_spec
from ctr_ensemble.export.served import served_models
from ctr_ensemble.layers.fusion import PARAMS
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
    served_as = served_models(manifest)  # after a deploy, release models serve the members
    mode, tau = manifest["fusion"]["mode"], float(manifest["fusion"]["tau"])
    spec = repository_spec(repository)
    arr = encode_file(data, spec, skip_bad_rows, fmt)
    feeds, y = arr.feeds(), arr.label.astype(np.int64)
    base = spec.fitted_on.get("label_mean")  # the training CTR; older specs do not record it
    summary: dict = {"data": str(data), "rows": int(len(y)), "skipped_rows": arr.skipped, "oracle_auc": None,
                     "base_rate": {"train": base, "self": float(y.mean()) if len(y) else None},
                     "fusion": {"mode": mode, "tau": tau, **{k: manifest["fusion"][k] for k in PARAMS if k != "tau" and k in manifest["fusion"]}},
                     "members": {n: {} for n in names}, "ensemble": {}}
    if truth is not None:
        p_true = np.load(truth)
        if len(p_true) != len(y):
            raise CtrError(f"{truth}: has {len(p_true)} probabilities but {data} has {len(y)} rows")
        summary["oracle_auc"] = metrics.auc(y, p_true)

    # The PyTorch member outputs are the reference for everything else; the ensemble's is the fusion as served
    # (the fusion model's config, or its collaborative head) over them.
    members = reference.checkpoint_members(manifest, dict(checkpoints or {}))
    fdir = repository / served_as[FUSION_NAME]
    fusion = reference.Fusion.from_config(read_config(fdir), fdir)
    ref: dict[str, np.ndarray] = {}
    ref_out: dict[str, tuple] = {}
    for n in names:
        (p, h), sec = _timed(lambda: reference.member_outputs(members[n], feeds))
        ref[n] = p.astype(np.float64)
        ref_out[n] = (ref[n], h if fusion.needs_repr else None)  # (N, H) per member: kept only where the fusion uses it
        if "torch" in backends:
            summary["members"][n]["torch"] = _row(y, ref[n], ref[n], sec, base)
    ref_fused = fusion.fuse(ref_out)[0].astype(np.float64)
    if "torch" in backends:
        summary["ensemble"]["torch"] = _row(y, ref_fused, ref_fused, None, base)

    if "onnx" in backends:
        out = {}
        for n in names:
            sess = onnx_export.session(repository / served_as[n] / "1" / "model.onnx")
            (p, h), sec = _timed(lambda: reference.member_outputs(sess, feeds))
            out[n] = (p, h if fusion.needs_repr else None)
            summary["members"][n]["onnx"] = _row(y, p, ref[n], sec, base)
        summary["ensemble"]["onnx"] = _row(y, fusion.fuse(out)[0], ref_fused, None, base)

    outputs = ("prob", "repr") if fusion.needs_repr else ("prob",)
    for backend, protocol, url in (("triton_http", "http", targets.http_url), ("triton_grpc", "grpc", targets.grpc_url)):
        if backend not in backends:
            continue
        if not url:
            raise CtrError(f"backend {backend} needs a server URL (--{protocol}-url) or --start-server")
        scorer = TritonScorer(url, protocol)
        scorer.check_ready(ENSEMBLE_NAME)
        out = {}
        for n in names:
            o, sec = _timed(lambda: scorer.score_outputs(served_as[n], feeds, targets.batch_size, outputs))
            out[n] = (o["prob"][:, 0], o.get("repr"))
            summary["members"][n][backend] = _row(y, out[n][0], ref[n], sec, base)
        served, sec = _timed(lambda: scorer.score(ENSEMBLE_NAME, feeds, targets.batch_size))
        row = _row(y, served, ref_fused, sec, base)
        # The server's fusion against the reference fusion of what the same server's members returned.
        row["fusion_max_abs_diff"] = float(np.max(np.abs(served - fusion.fuse(out)[0])))
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
