"""``ctr-ensemble check-export``: does a member survive ONNX export bit-for-bit (to 1e-5)?

Either builds ``arch`` from its default config, trains it a few steps on generated
Criteo-layout data with a behaviour sequence and exports it, or takes a user's checkpoint
(and optionally their data). ONNX Runtime is then compared with PyTorch on a few thousand
real rows, the same rows with out-of-vocabulary ids (negative, one past the vocabulary,
huge) and NaN/±Inf numerics, a batch of one, and, when the model takes a sequence, the
rows with history lengths 0, 1 and the maximum and with a shorter padded width (the
sequence axis is dynamic).

It lives in ``evaluation`` rather than ``export`` because it trains the member it checks (``--model``):
export sits below training and imports nothing from it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from ctr_ensemble import models
from ctr_ensemble.data.encode import encode_file
from ctr_ensemble.data.fit import fit
from ctr_ensemble.data.spec import feed_rows, slice_feeds
from ctr_ensemble.data.synth import DEFAULT_CARDINALITIES, SynthConfig, generate
from ctr_ensemble.export import onnx_export
from ctr_ensemble.metrics import PARITY_TOL
from ctr_ensemble.models import checkpoint
from ctr_ensemble.models.checkpoint import Checkpoint
from ctr_ensemble.training.config import TrainConfig
from ctr_ensemble.training.member import train_member

# Smaller vocabularies than the demo keep the check quick; the layout is the full Criteo one.
CHECK_CARDINALITIES = tuple(min(c, 2000) for c in DEFAULT_CARDINALITIES)
CHECK_SEQ_LEN = 20


def _synth(workdir: Path, seed: int, splits: dict[str, int], seq_max_len: int, seq_name: str = "history") -> dict[str, Path]:
    meta = generate(workdir, SynthConfig(seed=seed, cardinalities=CHECK_CARDINALITIES, splits=splits,
                                         seq_max_len=seq_max_len, seq_name=seq_name))
    return {split: workdir / m["file"] for split, m in meta["splits"].items()}


def smoke_checkpoint(arch: str, overrides: dict | None, workdir: Path, rows: int, steps: int, seed: int,
                     sequence: bool = True) -> tuple[Checkpoint, Path]:
    """A member of ``arch`` trained ``steps`` steps on generated data (with a behaviour sequence unless
    ``sequence`` is False); returns it and the data file to check on."""
    cfg = models.make_config(arch, overrides)
    files = _synth(workdir, seed, {"train": max(steps * 256, 5000), "val": 1000, "test": rows},
                   CHECK_SEQ_LEN if sequence else 0)
    spec = fit(files["train"], min_count=2, seq_max_len=CHECK_SEQ_LEN)
    train, val = encode_file(files["train"], spec), encode_file(files["val"], spec)
    ck = train_member(arch, arch, cfg, spec, train, val, TrainConfig(epochs=1, batch_size=256, max_steps=steps, seed=seed))
    return ck, files["test"]


def sequence_cases(feeds: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """The real rows with their histories cut to length 0, 1 and the maximum (the full padded
    width), and trimmed to a shorter padded width: ONNX must follow PyTorch at every length."""
    ids, length = feeds["seq_ids"], feeds["seq_len"]
    width = ids.shape[1]
    cases = {}
    for name, n in (("seq_len_0", 0), ("seq_len_1", 1), ("seq_len_max", width)):
        f = dict(feeds)
        f["seq_len"] = np.full_like(length, n)
        cases[name] = f
    short = max(1, width // 2)
    cases[f"seq_width_{short}"] = {**feeds, "seq_ids": np.ascontiguousarray(ids[:, -short:]),
                                   "seq_len": np.minimum(length, short)}
    return cases


def check_export(ck: Checkpoint, data: Path, rows: int = 4096, workdir: Path | None = None) -> dict:
    """Export ``ck`` and compare ONNX Runtime with PyTorch; returns the parity figures."""
    feeds = slice_feeds(encode_file(data, ck.spec).feeds(), 0, rows)
    model = ck.build()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = onnx_export.export_member(model, ck.spec, Path(tmp) / "model.onnx")
        sess = onnx_export.session(path)
        cases = {"real": feeds, "oov_nan": onnx_export.stress_rows(feeds, ck.spec, max_rows=rows),
                 "batch_1": slice_feeds(feeds, 0, 1)}  # batch of one: the dynamic axis at its edge
        if ck.spec.sequence is not None:
            cases.update(sequence_cases(feeds))
        results = {name: onnx_export.parity(model, sess, f) for name, f in cases.items()}
    worst = max(r[k] for r in results.values() for k in ("prob_max_abs_diff", "repr_max_abs_diff"))
    return {"model": ck.name, "arch": ck.arch, "rows": feed_rows(feeds), **results, "cases": list(results),
            "max_abs_diff": worst, "tolerance": PARITY_TOL, "passed": bool(worst <= PARITY_TOL)}


def run(arch: str | None, checkpoint_path: Path | None, data: Path | None, overrides: dict | None,
        rows: int = 4096, steps: int = 30, seed: int = 0, sequence: bool = True) -> dict:
    torch.manual_seed(seed)
    np.random.seed(seed)
    with tempfile.TemporaryDirectory(prefix="ctr-check-") as tmp:
        if checkpoint_path is not None:
            ck = checkpoint.load(checkpoint_path)
            if data is None:
                # Generated Criteo-layout rows, encoded with the checkpoint's own spec (many ids are OOV for it).
                seq = ck.spec.sequence
                data = _synth(Path(tmp), seed, {"test": rows}, seq.max_len if seq else 0,
                              seq.name if seq else "history")["test"]
        else:
            ck, generated = smoke_checkpoint(arch, overrides, Path(tmp), rows, steps, seed, sequence)
            data = data or generated
        return check_export(ck, data, rows)
