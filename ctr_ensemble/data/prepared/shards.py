"""Reading a ``data prepare`` folder: the manifest, the feature spec and the shards as read-only memmaps.

Opening checks every shard file the manifest lists: present, the recorded size, and an .npy header with
the recorded shape and dtype; ``verify="full"`` also compares each file's CRC-32 (reads every byte).
A missing or damaged file is named in a ``CtrError`` with what to do about it. Rows are addressed
globally (shards laid end to end in manifest order); ``read`` slices contiguous rows out of the memmaps
without touching anything else, which is what the training loader builds its batches from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ctr_ensemble.data.prepared.manifest import MANIFEST, PREPARED_FORMAT, PREPARED_VERSION, SPEC_FILE, verify_files
from ctr_ensemble.data.spec import INPUT_DTYPES, FeatureSpec
from ctr_ensemble.errors import CtrError

VERIFY_MODES = ("size", "full")


def is_prepared(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``data prepare`` (it has a manifest)."""
    return (Path(path) / MANIFEST).is_file()


def _damage_hint(out: Path) -> str:
    return f"run the same `ctr-ensemble data prepare` again to re-encode it from the raw input, or prepare {out} anew"


class Prepared:
    """A prepared folder, opened. ``rows`` rows; ``columns`` the stored columns (``cat_ids``, ``num``,
    ``label`` and, with a sequence, ``seq_ids``/``seq_len``); ``spec`` the feature spec they are encoded with."""

    def __init__(self, path: str | Path, verify: str = "size"):
        if verify not in VERIFY_MODES:
            raise CtrError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise CtrError(f"{self.path}: not a prepared data folder ({MANIFEST} missing; write one with "
                           "`ctr-ensemble data prepare`)")
        try:
            m = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CtrError(f"{mpath}: not valid JSON ({e}); {_damage_hint(self.path)}") from e
        if m.get("format") != PREPARED_FORMAT or m.get("version") != PREPARED_VERSION:
            raise CtrError(f"{mpath}: not a ctr-ensemble prepared manifest of version {PREPARED_VERSION} "
                           f"(format={m.get('format')!r}, version={m.get('version')!r})")
        self.manifest = m
        self.spec = FeatureSpec.load(self.path / m["spec_file"])
        if self.spec.fingerprint() != m["spec_fingerprint"]:
            raise CtrError(f"{self.path / SPEC_FILE}: does not match the spec the shards were encoded with "
                           f"(fingerprint {self.spec.fingerprint()} vs {m['spec_fingerprint']} in {MANIFEST})")
        self.columns = list(m["columns"])
        if verify == "full":
            bad = verify_files(self.path, m, progress=True)
            if bad:
                raise CtrError(f"{self.path}: shard file(s) missing or corrupt (size/CRC-32 differ from {MANIFEST}): "
                               f"{', '.join(sorted(bad))}; {_damage_hint(self.path)}")
        self.shard_rows = np.array([s["rows"] for s in m["shards"]], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_rows)])
        self.rows = int(self.offsets[-1])
        self._maps: list[dict[str, np.ndarray]] = [self._open_shard(s) for s in m["shards"]]

    def _open_shard(self, shard: dict) -> dict[str, np.ndarray]:
        maps = {}
        for col in self.columns:
            f = shard["files"].get(col)
            if f is None:
                raise CtrError(f"{self.path / MANIFEST}: shard {shard['index']} lists no {col!r} file")
            p = self.path / f["file"]
            if not p.is_file():
                raise CtrError(f"{p}: shard file missing (listed in {MANIFEST}); {_damage_hint(self.path)}")
            size = p.stat().st_size
            if size != f["bytes"]:
                raise CtrError(f"{p}: shard file is corrupt: {size} bytes, {MANIFEST} says {f['bytes']}; "
                               f"{_damage_hint(self.path)}")
            try:
                arr = np.load(p, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise CtrError(f"{p}: shard file is corrupt (not a readable .npy: {e}); {_damage_hint(self.path)}") from e
            want_shape = [shard["rows"], *self.manifest["columns"][col]["shape"]]
            if list(arr.shape) != want_shape or arr.dtype.str != self.manifest["columns"][col]["dtype"]:
                raise CtrError(f"{p}: shard file is corrupt: shape {list(arr.shape)} {arr.dtype.str}, expected "
                               f"{want_shape} {self.manifest['columns'][col]['dtype']}; {_damage_hint(self.path)}")
            maps[col] = arr
        return maps

    def __len__(self) -> int:
        return self.rows

    def read(self, column: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one column in its storage dtype (a copy, contiguous)."""
        start, stop = max(0, start), min(stop, self.rows)
        if stop <= start:
            return np.asarray(self._maps[0][column][:0]) if self._maps else np.zeros(0)
        first = int(np.searchsorted(self.offsets, start, side="right") - 1)
        parts = []
        s = first
        while s < len(self._maps) and self.offsets[s] < stop:
            lo, hi = max(start, self.offsets[s]) - self.offsets[s], min(stop, self.offsets[s + 1]) - self.offsets[s]
            parts.append(self._maps[s][column][lo:hi])
            s += 1
        return np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])

    def feeds(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Model inputs (``FeatureSpec.input_names``, model dtypes) for rows [start, stop)."""
        stop = self.rows if stop is None else stop
        return {name: self.read(name, start, stop).astype(INPUT_DTYPES[name], copy=False)
                for name in self.spec.input_names}

    def labels(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self.read("label", start, self.rows if stop is None else stop).astype(np.float32)
