"""One ONNX file per member: dynamic batch, OOV mapping inside the graph, parity-checked."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ctr_ensemble.errors import CtrError
from torch import nn

from ctr_ensemble.models.base import OUTPUT_NAMES, Member, input_names

OPSET = 17
PARITY_TOL = 1e-5


class _WithoutNumeric(nn.Module):
    """Exports a member of a data set without numeric fields with ``cat_ids`` as its only input."""

    def __init__(self, member: Member):
        super().__init__()
        self.member = member

    def forward(self, cat_ids: torch.Tensor):
        return self.member(cat_ids, cat_ids[:, :0].to(torch.float32))  # num: (B, 0)


def export_member(model: Member, n_cat: int, n_num: int, path: str | Path) -> Path:
    """Write ``model`` to ``path``: inputs cat_ids INT64 [B, n_cat], num FP32 [B, n_num] (absent when
    n_num = 0); outputs prob FP32 [B, 1], repr FP32 [B, H]. Raises CtrError if onnx.checker fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    names = input_names(n_num)
    example = (torch.zeros(2, n_cat, dtype=torch.int64), torch.zeros(2, n_num, dtype=torch.float32))[: len(names)]
    if n_num == 0:
        model = _WithoutNumeric(model).eval()
    axes = {name: {0: "batch"} for name in (*names, *OUTPUT_NAMES)}
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated but exact for these graphs and needs no onnxscript.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, example, str(path), dynamo=False, input_names=list(names),
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


def run_onnx(sess: ort.InferenceSession, cat_ids: np.ndarray, num: np.ndarray, batch_size: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """(prob (N,), repr (N, H)) from an ONNX Runtime session, in batches."""
    probs, reps = [], []
    with_num = any(i.name == "num" for i in sess.get_inputs())
    for s in range(0, len(cat_ids), batch_size):
        feed = {"cat_ids": cat_ids[s : s + batch_size]}
        if with_num:
            feed["num"] = num[s : s + batch_size]
        p, h = sess.run(list(OUTPUT_NAMES), feed)
        probs.append(p[:, 0])
        reps.append(h)
    return np.concatenate(probs), np.concatenate(reps)


@torch.no_grad()
def parity(model: Member, sess: ort.InferenceSession, cat_ids: np.ndarray, num: np.ndarray) -> dict:
    """Max |ONNX − PyTorch| over prob and repr on the given rows."""
    p_t, h_t = model.eval()(torch.from_numpy(cat_ids), torch.from_numpy(num))
    p_o, h_o = run_onnx(sess, cat_ids, num)
    return {
        "rows": int(len(cat_ids)),
        "prob_max_abs_diff": float(np.max(np.abs(p_o - p_t[:, 0].numpy()))) if len(cat_ids) else 0.0,
        "repr_max_abs_diff": float(np.max(np.abs(h_o - h_t.numpy()))) if len(cat_ids) else 0.0,
    }


def stress_rows(cat_ids: np.ndarray, num: np.ndarray, cat_sizes: list[int], seed: int = 0, max_rows: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Copies of real rows with out-of-vocabulary ids (negative, = size, huge) and NaN/±Inf numerics."""
    rng = np.random.default_rng(seed)
    n = min(len(cat_ids), max_rows)
    c = cat_ids[:n].copy()
    x = num[:n].copy()
    sizes = np.asarray(cat_sizes)
    for k, bad in enumerate((-1, -(2**62), None, 2**62)):
        rows = slice(k * n // 4, (k + 1) * n // 4)
        cols = rng.random((c[rows].shape[0], c.shape[1])) < 0.3
        value = np.broadcast_to(sizes, c[rows].shape) if bad is None else np.full(c[rows].shape, bad)
        c[rows] = np.where(cols, value, c[rows])
    special = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30], dtype=np.float32)
    mask = rng.random(x.shape) < 0.2
    x[mask] = rng.choice(special, mask.sum())
    return c, x
