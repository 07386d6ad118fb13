"""One ONNX file per member: dynamic batch, OOV mapping inside the graph, parity-checked."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from ctr_ensemble.data.spec import INPUT_DTYPES, FeatureSpec, feed_rows, slice_feeds
from ctr_ensemble.errors import CtrError
from ctr_ensemble.models.base import OUTPUT_NAMES, Member

OPSET = 17


class _ByName(nn.Module):
    """Exports a member with exactly the spec's inputs, in order (``num`` absent without numeric fields,
    ``seq_ids``/``seq_len`` only with a sequence field)."""

    def __init__(self, member: Member, names: tuple[str, ...]):
        super().__init__()
        self.member, self.names = member, names

    def forward(self, *inputs: torch.Tensor):
        return self.member(**dict(zip(self.names, inputs)))


def export_member(model: Member, spec: FeatureSpec, path: str | Path) -> Path:
    """Write ``model`` to ``path``: inputs ``spec.input_names`` (cat_ids INT64 [B, n_cat], num FP32
    [B, n_num], seq_ids INT64 [B, L], seq_len INT64 [B, 1]; B and L dynamic); outputs prob FP32 [B, 1],
    repr FP32 [B, H]. Raises CtrError if onnx.checker fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = spec.input_names
    shapes = {"cat_ids": (2, spec.n_cat), "num": (2, spec.n_num), "seq_ids": (2, 3), "seq_len": (2, 1)}
    example = tuple(torch.zeros(shapes[n], dtype=getattr(torch, np.dtype(INPUT_DTYPES[n]).name)) for n in names)
    axes = {name: {0: "batch"} for name in (*names, *OUTPUT_NAMES)}
    if "seq_ids" in names:
        axes["seq_ids"] = {0: "batch", 1: "seq"}
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated but exact for these graphs and needs no onnxscript.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _ByName(model.eval(), names).eval(), example, str(path), dynamo=False, input_names=list(names),
            output_names=list(OUTPUT_NAMES), dynamic_axes=axes, opset_version=OPSET,
        )
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise CtrError(f"{path}: exported ONNX model fails onnx.checker: {str(e).splitlines()[0]}") from e
    return path


def session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], batch_size: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """(prob (N,), repr (N, H)) from an ONNX Runtime session, in batches; ``feeds`` by input name."""
    wanted = [i.name for i in sess.get_inputs()]
    missing = [n for n in wanted if n not in feeds]
    if missing:
        raise CtrError(f"ONNX model needs inputs {wanted}; missing {missing}")
    probs, reps = [], []
    for s in range(0, feed_rows(feeds), batch_size):
        p, h = sess.run(list(OUTPUT_NAMES), {n: feeds[n][s : s + batch_size] for n in wanted})
        probs.append(p[:, 0])
        reps.append(h)
    return np.concatenate(probs), np.concatenate(reps)


@torch.no_grad()
def parity(model: Member, sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict:
    """Max |ONNX − PyTorch| over prob and repr on the given rows."""
    p_t, h_t = model.eval()(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    p_o, h_o = run_onnx(sess, feeds)
    n = feed_rows(feeds)
    return {
        "rows": int(n),
        "prob_max_abs_diff": float(np.max(np.abs(p_o - p_t[:, 0].numpy()))) if n else 0.0,
        "repr_max_abs_diff": float(np.max(np.abs(h_o - h_t.numpy()))) if n else 0.0,
    }


def stress_rows(feeds: dict[str, np.ndarray], spec: FeatureSpec, seed: int = 0, max_rows: int = 512) -> dict[str, np.ndarray]:
    """Copies of real rows with out-of-vocabulary ids (negative, = size, huge), NaN/±Inf numerics and,
    with a sequence, OOV item ids, garbage in the padding, and lengths 0, 1, the maximum and beyond."""
    rng = np.random.default_rng(seed)
    n = min(feed_rows(feeds), max_rows)
    out = {k: v[:n].copy() for k, v in slice_feeds(feeds, 0, n).items()}
    c = out["cat_ids"]
    sizes = np.asarray(spec.cat_sizes)
    for k, bad in enumerate((-1, -(2**62), None, 2**62)):
        rows = slice(k * n // 4, (k + 1) * n // 4)
        cols = rng.random((c[rows].shape[0], c.shape[1])) < 0.3
        value = np.broadcast_to(sizes, c[rows].shape) if bad is None else np.full(c[rows].shape, bad)
        c[rows] = np.where(cols, value, c[rows])
    if "num" in out:
        x = out["num"]
        special = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30], dtype=np.float32)
        mask = rng.random(x.shape) < 0.2
        x[mask] = rng.choice(special, mask.sum())
    if "seq_ids" in out:
        ids, length = out["seq_ids"], out["seq_len"]
        width = ids.shape[1]
        bad_ids = np.array([-1, -(2**62), spec.sequence.size, 2**62])
        mask = rng.random(ids.shape) < 0.2
        ids[mask] = rng.choice(bad_ids, mask.sum())
        # Lengths at and beyond the edges; padding slots hold ids that must be ignored.
        length[:, 0] = rng.choice(np.array([0, 1, width, width + 5, -3, 2**40]), n)
    return out
