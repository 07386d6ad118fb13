"""The layout of a ``data prepare`` folder, the one home of its names and of its file entries.

    manifest.json                       format, version, the spec's fingerprint, the inputs and options,
                                        rows, columns (storage dtype and per-row shape) and, per shard, its
                                        rows, input span and one entry per column file
    feature_spec.json                   the spec the shards are encoded with
    shards/part-NNNNN.<column>.npy      one file per shard and column (``STORAGE_DTYPES``)

A file entry (``write_npy``) records the path relative to the folder, size, CRC-32, shape and dtype;
``verify_files`` checks size and CRC-32 against it. Every file is written under a temporary name, flushed to
disk and renamed, then its folder flushed (``files.write_atomic``), so a reader never sees half a file, nor
a crash half a manifest. Writing the folder: ``prepare.py``;
reading it: ``shards.py``.
"""

from __future__ import annotations

import io
import json
import zlib
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ctr_ensemble.files import write_atomic

PREPARED_FORMAT = "ctr-ensemble/prepared"
PREPARED_VERSION = 1
MANIFEST = "manifest.json"
SPEC_FILE = "feature_spec.json"
SHARDS = "shards"
# Storage dtype per column (the model dtype is spec.INPUT_DTYPES; label → float32).
STORAGE_DTYPES = {"cat_ids": np.int32, "num": np.float32, "label": np.uint8, "seq_ids": np.int32, "seq_len": np.int32}


def shard_file(i: int, column: str) -> str:
    return f"{SHARDS}/part-{i:05d}.{column}.npy"


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def write_npy(out: Path, rel: str, arr: np.ndarray) -> dict:
    """Write ``out/rel`` atomically; its manifest entry (path relative to ``out``, size, CRC-32, shape, dtype)."""
    return {"file": rel, **write_atomic(out / rel, _npy_bytes(arr)), "shape": list(arr.shape),
            "dtype": np.dtype(arr.dtype).str}


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while b := f.read(16 << 20):
            crc = zlib.crc32(b, crc)
    return crc


def write_json_atomic(path: Path, obj, what: str = "JSON file") -> None:
    write_atomic(path, json.dumps(obj, indent=1).encode(), what=what)


def verify_files(out: Path, manifest: dict, progress: bool = False) -> set[str]:
    """Relative paths of the shard files that are missing, of the wrong size, or fail their CRC-32."""
    bad = set()
    files = [f for s in manifest["shards"] for f in s["files"].values()]
    for f in tqdm(files, desc=f"verify {out.name}", unit="file", disable=not progress, leave=False):
        p = out / f["file"]
        if not p.is_file() or p.stat().st_size != f["bytes"] or file_crc32(p) != f["crc32"]:
            bad.add(f["file"])
    return bad
