"""The reader registry: one entry point (``open_reader``) for every supported input format.

Each format is one module here with one ``Reader`` subclass (``base.py``: the protocol, ``RawBatch``,
``ReadStats``, ``Span``); ``READERS`` lists them. A new format is a new module plus its entry in ``READERS``:
``open_reader``, ``--format``, ``detect_format`` (through the class's ``folders``/``suffixes``/``magic``/
``sniff``), ``data fit``, ``data prepare`` (through ``spans``/``part``) and encoding then take it.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from ctr_ensemble.data.readers.avazu import AvazuReader
from ctr_ensemble.data.readers.base import RawBatch, ReadStats, Reader, concat_batches, read_head
from ctr_ensemble.data.readers.criteo import CriteoReader
from ctr_ensemble.data.readers.jsonl import JSONLReader
from ctr_ensemble.data.readers.libsvm import LibSVMReader
from ctr_ensemble.data.readers.parquet import ParquetReader
from ctr_ensemble.errors import CtrError

# Format name → reader; the order is the order in which ``detect_format`` asks the readers' ``sniff``.
READERS: dict[str, type[Reader]] = {
    "criteo": CriteoReader,
    "jsonl": JSONLReader,  # before avazu: a 24-key object has the 23 commas of avazu's sniff
    "avazu": AvazuReader,
    "libsvm": LibSVMReader,
    "parquet": ParquetReader,
}
FORMATS = tuple(READERS)
DEFAULT_FORMAT = "criteo"  # what a file no reader recognises is read as


def detect_format(path: str | Path) -> str:
    """Guess the format from the file name and first line; Criteo TSV is the default.

    A folder → the format that reads folders (parquet); a name ending (optionally before ``.gz``) in a
    reader's ``suffixes`` → that format (``.parquet``; ``.jsonl/.ndjson`` → jsonl; ``.svm/.libsvm/.libfm/.ffm``
    → libsvm); otherwise the file's first bytes (``magic``: Parquet's PAR1), then its first line (read through
    gzip for ``.gz``) decide, by each reader's ``sniff`` in ``READERS`` order: a JSON object → jsonl, an Avazu
    header or 23 commas → avazu, ``label idx:val ...`` → libsvm, else criteo.
    """
    path = Path(path)
    name = path.name.lower()
    base = name[:-3] if name.endswith(".gz") else name
    if path.is_dir():
        return next(fmt for fmt, cls in READERS.items() if cls.folders)
    for fmt, cls in READERS.items():
        if cls.suffixes and base.endswith(cls.suffixes):
            return fmt
    if not path.is_file():
        return DEFAULT_FORMAT
    with open(path, "rb") as f:
        start = f.read(max(len(cls.magic) for cls in READERS.values()))
    for fmt, cls in READERS.items():
        if cls.magic and start.startswith(cls.magic):
            return fmt
    try:
        head = read_head(path)
    except (OSError, EOFError, zlib.error):
        return DEFAULT_FORMAT  # the reader reports the unreadable file
    return next((fmt for fmt, cls in READERS.items() if cls.sniff(head)), DEFAULT_FORMAT)


def open_reader(path: str | Path, fmt: str = "auto", skip_bad_rows: bool = False) -> Reader:
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in READERS:
        raise CtrError(f"unknown data format {fmt!r}; supported: auto, {', '.join(READERS)}")
    return READERS[fmt](path, skip_bad_rows=skip_bad_rows)


def read_all(path: str | Path, fmt: str = "auto", skip_bad_rows: bool = False) -> tuple[RawBatch, ReadStats]:
    """Read a whole (small enough) file into one RawBatch."""
    reader = open_reader(path, fmt, skip_bad_rows)
    batch = concat_batches(list(reader))
    if batch is None:
        raise CtrError(f"{path}: no valid rows")
    return batch, reader.stats
