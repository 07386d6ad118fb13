"""Atomic file writes, with an optional SHA-256 sidecar, and the checked read that goes with them.

Low level on purpose (standard library and ``errors`` only, no torch): data, models and training write through it.
"""

from __future__ import annotations

import hashlib
import os
import re
import zlib
from pathlib import Path

from ctr_ensemble.errors import CtrError


# A name that becomes a folder of the Triton repository (a member's model) and part of file names: no path
# separator, no leading dot (so no ".." and no hidden folder), nothing a shell or a URL would mangle.
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_name(name: object, what: str) -> str:
    """``name`` if it is a valid model name (``MODEL_NAME``), else a CtrError naming ``what`` carried it."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise CtrError(f"{what}: {name!r} is not a valid model name; it becomes a folder of the Triton repository, "
                       "so use letters, digits, '_', '.' and '-', starting with a letter, a digit or '_' "
                       "(^[A-Za-z0-9_][A-Za-z0-9_.-]*$)")
    return name


def sha256_path(path: Path) -> Path:
    """The checksum sidecar of ``path``: ``<path>.sha256``."""
    return path.with_name(path.name + ".sha256")


def write_atomic(path: str | Path, data: bytes, checksum: bool = False, fsync: bool = False, what: str = "file") -> dict:
    """Write ``data`` to ``path`` by temp file + rename, so a reader never sees half a file; returns its size and
    CRC-32 (``bytes``, ``crc32``, what a manifest records). ``checksum`` also writes the sidecar ``<path>.sha256``
    (renamed in first: a crash between the renames leaves a checksum that fails loudly, never a silent mismatch);
    ``fsync`` flushes the data to disk before the rename (checkpoints). A failed write (disk full, quota, I/O
    error) removes its temp files and raises CtrError naming ``what``; nothing was replaced then."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    sha_tmp = sha256_path(tmp)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if checksum:
            sha_tmp.write_text(hashlib.sha256(data).hexdigest() + "\n")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        sha_tmp.unlink(missing_ok=True)
        raise CtrError(f"{path}: cannot write the {what} ({e.strerror or e}); "
                       f"{f'the previous {what} there is intact' if path.exists() else 'nothing was written'}") from e
    if checksum:
        sha_tmp.replace(sha256_path(path))
    tmp.replace(path)
    return {"bytes": len(data), "crc32": zlib.crc32(data)}


def read_checked(path: str | Path, what: str = "file") -> bytes:
    """The bytes of ``path``, verified against its ``.sha256`` sidecar when it has one (``write_atomic``)."""
    path = Path(path)
    if not path.is_file():
        raise CtrError(f"{path}: {what} not found")
    data = path.read_bytes()
    sha = sha256_path(path)
    if sha.is_file():
        want = sha.read_text().strip()
        got = hashlib.sha256(data).hexdigest()
        if want != got:
            raise CtrError(f"{path}: {what} is corrupt (sha256 {got[:12]}… does not match {sha.name}: {want[:12]}…)")
    return data


def remove(path: str | Path) -> None:
    """Delete a file written by ``write_atomic`` and its sidecar (missing is fine)."""
    path = Path(path)
    for p in (sha256_path(path), path):
        p.unlink(missing_ok=True)
