"""One entry point for every supported input format.

Each reader streams a file in chunks and yields ``RawBatch``es; it names its fields
(``label_name``, ``num_names``, ``cat_names``, ``seq_name``) so the feature spec can be
fitted on them and later files checked against them. Bad rows raise ``CtrError`` naming
file and line, or are skipped and counted (``stats``) with ``skip_bad_rows``.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from ctr_ensemble.data.avazu import AvazuReader, has_avazu_header, read_head
from ctr_ensemble.data.criteo import CriteoReader, RawBatch, ReadStats
from ctr_ensemble.data.libsvm import LibSVMReader
from ctr_ensemble.data.parquet import ParquetReader
from ctr_ensemble.errors import CtrError

READERS: dict[str, type] = {
    "criteo": CriteoReader,
    "avazu": AvazuReader,
    "libsvm": LibSVMReader,
    "parquet": ParquetReader,
}
FORMATS = tuple(READERS)
_LIBSVM_TOKEN = re.compile(rb"^[^:\s]+(:[^:\s]+){1,2}$")


def detect_format(path: str | Path) -> str:
    """Guess the format from the file name and first line; Criteo TSV is the default.

    ``.parquet`` or a folder → parquet; ``.svm/.libsvm/.libfm/.ffm`` (optionally ``.gz``) → libsvm;
    otherwise the first line (read through gzip for ``.gz``) decides: Parquet magic → parquet,
    an Avazu header or 23 commas → avazu, ``label idx:val ...`` → libsvm, else criteo.
    """
    path = Path(path)
    name = path.name.lower()
    base = name[:-3] if name.endswith(".gz") else name
    if base.endswith(".parquet") or path.is_dir():
        return "parquet"
    if base.endswith((".svm", ".libsvm", ".libfm", ".ffm")):
        return "libsvm"
    if not path.is_file():
        return "criteo"
    with open(path, "rb") as f:
        if f.read(4) == b"PAR1":
            return "parquet"
    try:
        head = read_head(path)
    except (OSError, EOFError, zlib.error):
        return "criteo"  # the reader reports the unreadable file
    if has_avazu_header(head) or (head.count(b",") == 23 and b"\t" not in head):
        return "avazu"
    toks = head.split()
    if (len(toks) >= 2 and b"\t" not in head.strip() and re.match(rb"^[+-]?[01](\.0*)?$", toks[0])
            and all(_LIBSVM_TOKEN.match(t) for t in toks[1:])):
        return "libsvm"
    return "criteo"


def open_reader(path: str | Path, fmt: str = "auto", skip_bad_rows: bool = False):
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in READERS:
        raise CtrError(f"unknown data format {fmt!r}; supported: auto, {', '.join(READERS)}")
    return READERS[fmt](path, skip_bad_rows=skip_bad_rows)


def field_names(reader) -> dict:
    return {"label": reader.label_name, "numeric": list(reader.num_names), "categorical": list(reader.cat_names),
            "sequence": reader.seq_name}


def read_all(path: str | Path, fmt: str = "auto", skip_bad_rows: bool = False) -> tuple[RawBatch, ReadStats]:
    """Read a whole (small enough) file into one RawBatch."""
    reader = open_reader(path, fmt, skip_bad_rows)
    batch = concat_batches(list(reader))
    if batch is None:
        raise CtrError(f"{path}: no valid rows")
    return batch, reader.stats


def concat_batches(batches: list[RawBatch]) -> RawBatch | None:
    """One RawBatch from several of the same reader (None for none)."""
    if not batches:
        return None
    if len(batches) == 1:
        return batches[0]
    seq = None
    if batches[0].seq is not None:
        seq = pa.concat_arrays([b.seq for b in batches])
    return RawBatch(
        label=np.concatenate([b.label for b in batches]),
        num=np.concatenate([b.num for b in batches]),
        cat=[pa.concat_arrays([b.cat[f] for b in batches]) for f in range(len(batches[0].cat))],
        first_line=batches[0].first_line,
        seq=seq,
    )
