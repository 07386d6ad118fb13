"""What every reader shares, whatever the format: the one home of ``RawBatch``, ``ReadStats``, ``Span``, the
``Reader`` protocol and ``TextParts`` (the byte-range reading of the plain-text formats).

A reader streams one input (a file, or for Parquet a folder) in chunks and yields ``RawBatch``es. It names
its fields (``label_name``, ``num_names``, ``cat_names``, ``seq_name``) so the feature spec can be fitted on
them and later files checked against them. Bad rows raise ``CtrError`` naming file and line, or with
``skip_bad_rows`` are skipped and counted in ``stats``. ``spans`` cuts the input into pieces that ``part``
reads on their own (``data prepare`` reads in such pieces, in parallel).
"""

from __future__ import annotations

import copy
import gzip
import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctr_ensemble.errors import CtrError


@dataclass
class RawBatch:
    """One chunk of raw rows, whatever the format: labels, numerics (NaN = missing), categoricals as strings."""

    label: np.ndarray  # (B,) int64 in {0, 1}
    num: np.ndarray  # (B, n_num) float64, NaN where missing; n_num may be 0
    cat: list[pa.Array]  # n_cat arrays of (B,) strings, "" where missing
    first_line: int  # 1-based line (or row) number of the first row in its file
    seq: pa.Array | None = None  # (B,) list<string>: the behaviour sequence, oldest first; None if the data has none


def list_lengths(seq: pa.Array) -> np.ndarray:
    """Items per row (B,) int64 of a list array (``RawBatch.seq``); a null list has none."""
    return pc.fill_null(pc.list_value_length(seq), 0).to_numpy(zero_copy_only=False).astype(np.int64)


@dataclass
class ReadStats:
    rows: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def bad_row(self, msg: str, skip: bool) -> None:
        """Raise ``msg`` as a CtrError, or with ``skip`` (--skip-bad-rows) count it, keeping a few examples."""
        if not skip:
            raise CtrError(msg)
        self.skipped += 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(msg)


@dataclass(frozen=True)
class Span:
    """A piece of one input file that a reader can read on its own (``data prepare`` works in such pieces).

    Text formats: bytes ``[start, stop)`` (``stop`` -1 = to the end) beginning at a line start, whose first
    line is line ``first_line`` of the file (0: not known yet, see ``count_lines_before``). Parquet:
    ``row_groups`` of ``file``, whose first row is row ``first_line`` of the file.
    """

    file: str
    start: int = 0
    stop: int = -1
    first_line: int = 1
    row_groups: tuple[int, ...] = ()


class Reader:
    """The reader protocol: what ``readers.open_reader`` returns, ``data fit``/``data prepare`` and the
    encoder rely on. A new format is one subclass in its own module plus its entry in ``readers.READERS``.

    Format detection (``readers.detect_format``) reads these class attributes, all optional:
    ``folders`` (a folder is read by this format), ``suffixes`` (file-name endings, before an optional
    ``.gz``, that mean this format), ``magic`` (the file's first raw bytes) and ``sniff(head)`` (whether the
    file's first line, at most 4096 bytes and decompressed for ``.gz``, is in this format).
    """

    format: str
    folders: bool = False
    suffixes: tuple[str, ...] = ()
    magic: bytes = b""
    path: Path
    stats: ReadStats
    label_name: str
    num_names: list[str]
    cat_names: list[str]
    seq_name: str | None = None

    # Constructed as ``cls(path, skip_bad_rows=...)``; format-specific options are keyword arguments with defaults.

    @staticmethod
    def sniff(head: bytes) -> bool:
        return False

    def __iter__(self) -> Iterator[RawBatch]:
        raise NotImplementedError

    def spans(self, chunk_bytes: int) -> list[tuple[Span, int]]:
        """The input cut into pieces of about ``chunk_bytes``, each with its size in bytes."""
        raise NotImplementedError

    def part(self, span: Span) -> Reader:
        """A reader over one piece of ``spans`` (same fields, its own ``stats``)."""
        raise NotImplementedError


def label_name(names: list[str], label: str | None, source, what: str = "column") -> str:
    """The label among ``names`` (a file's columns or keys): ``label`` if given, else ``label``, then ``click``."""
    if label is None:
        label = next((c for c in ("label", "click") if c in names), None)
        if label is None:
            raise CtrError(f"{source}: no label {what} (looked for 'label', then 'click'; pass label=...); "
                           f"{what}s: {names}")
    elif label not in names:
        raise CtrError(f"{source}: label {what} {label!r} not in the file; {what}s: {names}")
    return label


def field_names(reader: Reader) -> dict:
    return {"label": reader.label_name, "numeric": list(reader.num_names), "categorical": list(reader.cat_names),
            "sequence": reader.seq_name}


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


class ArrowRowErrors:
    """The ``invalid_row_handler`` of a pyarrow CSV reader (Criteo, Avazu). pyarrow swallows exceptions raised in
    the handler, so the first error is kept (``_pending``) and raised after the batch (``_raise_pending``); the
    dropped lines are recorded (``_invalid_lines``, -1: unknown) so later line numbers stay right. The reader
    sets ``_pending = None`` and ``_invalid_lines = []``, says what a row should be in ``row_layout`` and
    reports a bad row with ``_bad(where, what, line)``."""

    row_layout = ""

    def _on_invalid_row(self, row) -> str:
        number = row.number + self._line_offset if row.number is not None else None
        self._invalid_lines.append(number if number is not None else -1)
        try:
            self._bad(f"line {number if number is not None else '?'}",
                      f"expected {row.expected_columns} {self.row_layout}, got {row.actual_columns}", number)
        except CtrError as e:
            self._pending = self._pending or e
        return "skip"

    def _raise_pending(self) -> None:
        if self._pending is not None:
            err, self._pending = self._pending, None
            raise err


class TextParts(Reader):
    """Reading one byte range of a plain text file with the file-level facts (header, field count) of the
    whole-file reader. A reader over a part reads only those bytes and numbers lines from ``first_line``.
    ``_line_blocks`` reads the lines of the file (or part) in blocks of about ``block_size`` bytes."""

    _span: Span | None = None
    block_size: int = 8 << 20

    def spans(self, chunk_bytes: int) -> list[tuple[Span, int]]:
        """Byte ranges of about ``chunk_bytes`` ending at line ends; a gzip file is one piece (a compressed
        stream cannot be entered half-way). Only the first piece's first line is known (``Span``)."""
        if self.path.name.lower().endswith(".gz"):
            return [(Span(str(self.path)), self.path.stat().st_size)]
        size = self.path.stat().st_size
        spans, start = [], 0
        with open(self.path, "rb") as f:
            while start < size:
                stop = min(start + chunk_bytes, size)
                if stop < size:
                    f.seek(stop)
                    f.readline()
                    stop = f.tell()
                spans.append((Span(str(self.path), start, stop, first_line=1 if start == 0 else 0), stop - start))
                start = stop
        return spans

    def part(self, span: Span):
        if Path(span.file) != self.path:
            raise ValueError(f"span of {span.file} given to the reader of {self.path}")
        other = copy.copy(self)
        other.stats = ReadStats()
        other._span = span
        return other

    @property
    def _line_offset(self) -> int:
        """Added to a line number counted from the start of what is read."""
        return self._span.first_line - 1 if self._span is not None else 0

    def _read_span(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self._span.start)
            return f.read() if self._span.stop < 0 else f.read(self._span.stop - self._span.start)

    def _open(self):
        """What is read, as a binary file: the part's bytes, else the whole file (through gzip for ``.gz``)."""
        if self._span is not None:
            return io.BytesIO(self._read_span())
        return gzip.open(self.path, "rb") if self.path.name.lower().endswith(".gz") else open(self.path, "rb")

    def _line_blocks(self) -> Iterator[tuple[list[bytes], int]]:
        """The raw lines in blocks of about ``block_size`` bytes, each block with its first line's number in
        the file; a read error (a truncated gzip) names the file and the line near it."""
        line = 1 + self._line_offset
        with self._open() as f:
            while True:
                try:
                    lines = f.readlines(self.block_size)
                except (OSError, EOFError, zlib.error) as e:
                    raise CtrError(f"{self.path}: near line {line}: cannot read: {error_line(e)}") from e
                if not lines:
                    return
                yield lines, line
                line += len(lines)


def count_lines_before(path: str, offset: int) -> int:
    """Lines of a plain text file before byte ``offset`` (the first line of a span whose ``first_line`` is 0)."""
    n = 0
    with open(path, "rb") as f:
        left = offset
        while left > 0:
            b = f.read(min(left, 64 << 20))
            if not b:
                break
            n += b.count(b"\n")
            left -= len(b)
    return n


def read_head(path: Path, n: int = 4096) -> bytes:
    """The first line (at most ``n`` bytes) of a plain or gzip-compressed file."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        return f.readline(n)


def check_data_file(path: Path, expected: str) -> None:
    """A missing or empty input is named with what was expected in it."""
    if not path.is_file():
        raise CtrError(f"{path}: data file not found")
    if path.stat().st_size == 0:
        raise CtrError(f"{path}: data file is empty (expected {expected})")


def parsed_lines(first: int, n: int, dropped: list[int]) -> np.ndarray:
    """1-based file line of each of the ``n`` rows a CSV chunk starting at line ``first`` parsed: the chunk's
    lines less those its invalid-row handler ``dropped`` (-1 = line unknown: then counted from ``first``)."""
    span = np.arange(first, first + n + len(dropped))
    return span[~np.isin(span, dropped)][:n] if -1 not in dropped else span[:n]


def drop_bad_utf8(batch: pa.RecordBatch, lines: np.ndarray, bad) -> tuple[pa.RecordBatch, np.ndarray]:
    """Rows of ``batch`` (string columns read without a UTF-8 check) with a field that is not UTF-8 text:
    each is reported through ``bad(line, column, why)``, which raises or counts (--skip-bad-rows), and removed.
    ``lines``: the file line of each row; returns the batch and lines that are left."""
    rows: dict[int, tuple[str, str]] = {}
    for name, col in zip(batch.schema.names, batch.columns):
        try:  # the cast validates UTF-8 in one vectorised pass; rows are decoded one by one only when it fails
            pc.cast(col.view(pa.binary()), pa.string())
        except pa.ArrowInvalid:
            for i, v in enumerate(col.view(pa.binary()).to_pylist()):
                if i not in rows:
                    try:
                        v.decode("utf-8")
                    except UnicodeDecodeError as e:
                        rows[i] = (name, f"not UTF-8 text: {e.reason} at byte {e.start} of {v[:40]!r}")
    if not rows:
        return batch, lines
    for i in sorted(rows):
        bad(int(lines[i]), *rows[i])
    keep = np.ones(batch.num_rows, dtype=bool)
    keep[list(rows)] = False
    return batch.filter(pa.array(keep)), lines[keep]


def error_line(e: Exception) -> str:
    """The first line of an exception's message (its type name when it has none), for a reader's error."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
