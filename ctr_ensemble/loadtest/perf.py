"""Triton's own load generator, ``perf_analyzer``, on the same rows and concurrency as Locust.

Where the binary comes from: ``--perf-analyzer PATH``, else ``$PERF_ANALYZER``, else
``.venv-perf/bin/perf_analyzer`` (``make perf-venv``, from the pinned ``requirements-perf.txt``),
else ``perf_analyzer`` on PATH. PyPI ``perf-analyzer`` 2.58+ ships a binary built for glibc 2.38;
on older systems (Debian 12 has 2.36) it cannot start, so ``requirements-perf.txt`` pins the
``tritonclient`` 2.51 wheel, whose ``bin/perf_analyzer`` is the Triton 2.51 tool (the release of
the server here) built for glibc 2.34. It needs ``libb64.so.0d`` and ``libcudart.so.12``: when
the system lacks them they are taken from the nvidia-pytriton wheel (which carries both).

Real rows go in through ``--input-data``: one JSON entry per row (no batch dimension), each
tensor as base64 little-endian bytes (exact, NaN included); with ``-b B`` perf_analyzer sends B
consecutive entries per request.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ctr_ensemble.errors import CtrError
from ctr_ensemble.loadtest.rows import InputSpec

VENV_BINARY = Path(".venv-perf/bin/perf_analyzer")
SHIM_LIBS = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


def find_binary(explicit: str | Path | None = None) -> Path | None:
    for cand in (explicit, os.environ.get("PERF_ANALYZER"), VENV_BINARY if VENV_BINARY.is_file() else None,
                 shutil.which("perf_analyzer")):
        if cand:
            return Path(cand).resolve()
    return None


def _missing_libs(binary: Path) -> list[str]:
    try:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return re.findall(r"^\s*(\S+) => not found", out, flags=re.M)


def environment(binary: Path, shim_dir: Path) -> dict:
    """Process environment for ``binary``: missing libb64/libcudart linked from the nvidia-pytriton wheel."""
    env = dict(os.environ)
    missing = [m for m in _missing_libs(binary) if m in SHIM_LIBS]
    if missing:
        from ctr_ensemble.serving.server import pytriton_root

        libs = pytriton_root().parent / "nvidia_pytriton.libs"
        shim_dir.mkdir(parents=True, exist_ok=True)
        for name in missing:
            found = sorted(libs.glob(SHIM_LIBS[name]))
            if found and not (shim_dir / name).exists():
                (shim_dir / name).symlink_to(found[0])
        env["LD_LIBRARY_PATH"] = f"{shim_dir}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"
    return env


def why_not_runnable(binary: Path | None) -> str | None:
    """None if ``binary --version`` runs here, else the reason (for a clean skip)."""
    if binary is None:
        return "perf_analyzer not found (make perf-venv, or --perf-analyzer PATH)"
    if not binary.is_file():
        return f"{binary}: no such file"
    with tempfile.TemporaryDirectory(prefix="pa-shim-") as tmp:
        try:
            p = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30,
                               env=environment(binary, Path(tmp)))
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{binary} cannot run: {e}"
    text = (p.stdout + p.stderr).strip()
    if p.returncode != 0 or "Perf Analyzer" not in text:
        return f"{binary} cannot run here: {text.splitlines()[0] if text else f'exit {p.returncode}'}"
    return None


def input_data(rows: dict[str, np.ndarray], inputs: list[InputSpec], max_entries: int = 2048) -> dict:
    """perf_analyzer ``--input-data`` JSON: one entry per row, tensors as base64 little-endian bytes."""
    n = min(len(rows[inputs[0].name]), max_entries)
    from tritonclient.utils import triton_to_np_dtype

    data = []
    for r in range(n):
        entry = {}
        for spec in inputs:
            dt = np.dtype(triton_to_np_dtype(spec.datatype)).newbyteorder("<")
            entry[spec.name] = {"b64": base64.b64encode(np.ascontiguousarray(rows[spec.name][r], dtype=dt).tobytes()).decode()}
        data.append(entry)
    return {"data": data}


@dataclass
class PerfResult:
    rps: float
    rows_per_s: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    server_queue_ms: float
    server_compute_ms: float

    def as_dict(self, prefix: str = "pa_") -> dict:
        return {f"{prefix}{k}": round(v, 4) for k, v in self.__dict__.items()}


def run(binary: Path, model: str, url: str, protocol: str, batch: int, concurrency: int, input_json: Path,
        workdir: Path, headers: dict[str, str] | None = None, interval_ms: int = 1500, timeout_s: float = 120) -> PerfResult:
    """One perf_analyzer measurement at a fixed concurrency (time windows; stability check relaxed
    to at most 5 windows: a shared 2-core machine never holds latency within perf_analyzer's 10%)."""
    workdir.mkdir(parents=True, exist_ok=True)
    out_csv = workdir / f"pa-{model}-{protocol}-c{concurrency}.csv"
    cmd = [str(binary), "-m", model, "-u", url, "-i", protocol, "-b", str(batch), "--input-data", str(input_json),
           "--concurrency-range", str(concurrency), "--measurement-interval", str(interval_ms),
           "--stability-percentage", "1000", "--max-trials", "5", "-f", str(out_csv)]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}:{v}"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=environment(binary, workdir / "shim"))
    except subprocess.TimeoutExpired as e:
        raise CtrError(f"perf_analyzer on {model} ({protocol}, concurrency {concurrency}) ran past {timeout_s:.0f}s") from e
    if p.returncode != 0 or not out_csv.is_file():
        tail = " | ".join((p.stdout + p.stderr).strip().splitlines()[-3:])
        raise CtrError(f"perf_analyzer on {model} ({protocol}, concurrency {concurrency}) failed (exit {p.returncode}): {tail}")
    return parse_csv(out_csv, batch)


def parse_csv(path: Path, batch: int) -> PerfResult:
    """perf_analyzer ``-f`` CSV (times in µs, throughput in inferences = rows per second)."""
    with open(path, newline="") as f:
        row = next(csv.DictReader(f))
    us = lambda k: float(row[k]) / 1e3  # noqa: E731
    rows_per_s = float(row["Inferences/Second"])
    return PerfResult(
        rps=rows_per_s / batch, rows_per_s=rows_per_s,
        p50_ms=us("p50 latency"), p90_ms=us("p90 latency"), p95_ms=us("p95 latency"), p99_ms=us("p99 latency"),
        server_queue_ms=us("Server Queue"),
        server_compute_ms=us("Server Compute Input") + us("Server Compute Infer") + us("Server Compute Output"),
    )


def write_input_data(rows: dict[str, np.ndarray], inputs: list[InputSpec], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(input_data(rows, inputs)))
    return path
