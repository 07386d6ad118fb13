"""Streaming reader for Criteo-layout TSV (label, I1..I13, C1..C26; no header).

Files of any size are read in chunks with pyarrow's streaming CSV reader. Every
problem names the file and the 1-based line: a row with the wrong number of
columns, a label that is not 0/1, a numeric field that is not a number, a field
that is not UTF-8 text. With ``skip_bad_rows`` such rows are dropped and counted
instead of raising.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ctr_ensemble.data.schema import CAT_COLS, COLUMNS, LABEL, NUM_COLS
from ctr_ensemble.errors import CtrError


@dataclass
class RawBatch:
    """One chunk of raw rows, whatever the format: labels, numerics (NaN = missing), categoricals as strings."""

    label: np.ndarray  # (B,) int64 in {0, 1}
    num: np.ndarray  # (B, n_num) float64, NaN where missing; n_num may be 0
    cat: list[pa.Array]  # n_cat arrays of (B,) strings, "" where missing
    first_line: int  # 1-based line (or row) number of the first row in its file
    seq: pa.Array | None = None  # (B,) list<string>: the behaviour sequence, oldest first; None if the data has none


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
    line is line ``first_line`` of the file. Parquet: ``row_groups`` of ``file``, whose first row is row
    ``first_line`` of the file.
    """

    file: str
    start: int = 0
    stop: int = -1
    first_line: int = 1
    row_groups: tuple[int, ...] = ()


class TextParts:
    """Reading one byte range of a plain text file with the file-level facts (header, field count) of the
    whole-file reader. A reader over a part reads only those bytes and numbers lines from ``first_line``."""

    path: Path
    stats: ReadStats
    _span: Span | None = None

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


def check_data_file(path: Path, expected: str) -> None:
    """A missing or empty input is named with what was expected in it."""
    if not path.is_file():
        raise CtrError(f"{path}: data file not found")
    if path.stat().st_size == 0:
        raise CtrError(f"{path}: data file is empty (expected {expected})")


class CriteoReader(TextParts):
    """Iterate a Criteo-layout TSV file in chunks of about ``block_size`` bytes."""

    format = "criteo"
    label_name = LABEL
    num_names = NUM_COLS
    cat_names = CAT_COLS
    seq_name = None

    def __init__(self, path: str | Path, block_size: int = 8 << 20, skip_bad_rows: bool = False):
        self.path = Path(path)
        self.block_size = block_size
        self.skip_bad_rows = skip_bad_rows
        self.stats = ReadStats()
        self._pending: CtrError | None = None
        self._invalid_lines: list[int] = []  # lines the parser dropped (-1: unknown), so later line numbers stay right
        check_data_file(self.path, "Criteo TSV rows: label, I1..I13, C1..C26")

    def _bad(self, where: str, what: str) -> None:
        self.stats.bad_row(f"{self.path}:{where}: {what}", self.skip_bad_rows)

    def _on_invalid_row(self, row) -> str:
        # pyarrow swallows exceptions raised here: remember the first error and raise it after the batch.
        number = row.number + self._line_offset if row.number is not None else None
        line = number if number is not None else "?"
        self._invalid_lines.append(number if number is not None else -1)
        try:
            self._bad(
                f"line {line}",
                f"expected {row.expected_columns} tab-separated columns (label, I1..I13, C1..C26), got {row.actual_columns}",
            )
        except CtrError as e:
            self._pending = self._pending or e
        return "skip"

    def _raise_pending(self) -> None:
        if self._pending is not None:
            err, self._pending = self._pending, None
            raise err

    def __iter__(self) -> Iterator[RawBatch]:
        read_opts = pacsv.ReadOptions(column_names=COLUMNS, block_size=self.block_size, use_threads=False)
        parse_opts = pacsv.ParseOptions(delimiter="\t", quote_char=False, invalid_row_handler=self._on_invalid_row)
        # Everything is read as text and converted here, so a bad value can be located by line.
        # UTF-8 is checked here, not by the parser, whose error names neither the file's line nor lets the row be skipped.
        conv = pacsv.ConvertOptions(column_types={c: pa.string() for c in COLUMNS}, strings_can_be_null=False,
                                    check_utf8=False)
        try:
            source = self.path if self._span is None else pa.BufferReader(self._read_span())
            reader = pacsv.open_csv(source, read_options=read_opts, parse_options=parse_opts, convert_options=conv)
        except CtrError:
            raise
        except (pa.ArrowInvalid, OSError, EOFError, UnicodeDecodeError) as e:
            raise CtrError(f"{self.path}: cannot read as Criteo TSV: {_first_line(e)}") from e
        self._raise_pending()
        line = 1 + self._line_offset
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except CtrError:
                raise
            except (pa.ArrowInvalid, OSError, EOFError, UnicodeDecodeError) as e:
                raise CtrError(f"{self.path}: near line {line}: cannot parse: {_first_line(e)}") from e
            self._raise_pending()
            n = batch.num_rows
            invalid, self._invalid_lines = self._invalid_lines, []
            batch, lines = drop_bad_utf8(batch, parsed_lines(line, n, invalid),
                                         lambda ln, name, why: self._bad(f"line {ln}, field {name}", why))
            out = self._convert(batch, lines)
            line += n + len(invalid)
            if out is not None:
                self.stats.rows += len(out.label)
                yield out

    def _convert(self, batch: pa.RecordBatch, lines: np.ndarray) -> RawBatch | None:
        """``lines``: the 1-based line of each row in its file."""
        n = batch.num_rows
        if n == 0:
            return None
        keep = np.ones(n, dtype=bool)
        label_txt = batch.column(LABEL)
        label = np.zeros(n, dtype=np.int64)
        ok = pc.is_in(label_txt, value_set=pa.array(["0", "1"])).to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(~ok):
            self._bad(f"line {lines[i]}", f"label must be 0 or 1, got {label_txt[i].as_py()!r}")
            keep[i] = False
        label[ok] = (label_txt.to_numpy(zero_copy_only=False)[ok] == "1").astype(np.int64)
        num = np.empty((n, len(NUM_COLS)), dtype=np.float64)
        for j, name in enumerate(NUM_COLS):
            col = batch.column(name)
            is_empty = pc.equal(col, "")
            filled = pc.if_else(is_empty, pa.scalar(None, pa.string()), col)
            try:
                num[:, j] = pc.cast(filled, pa.float64()).to_numpy(zero_copy_only=False)
            except pa.ArrowInvalid:
                vals = col.to_pylist()
                for i, v in enumerate(vals):
                    if v == "":
                        num[i, j] = np.nan
                        continue
                    try:
                        num[i, j] = float(v)
                    except ValueError:
                        self._bad(f"line {lines[i]}, field {name}", f"expected a number or empty, got {v!r}")
                        keep[i] = False
                        num[i, j] = np.nan
        cats = [batch.column(name) for name in CAT_COLS]
        if not keep.all():
            mask = pa.array(keep)
            label, num = label[keep], num[keep]
            cats = [pc.filter(c, mask) for c in cats]
            if not keep.any():
                return None
        return RawBatch(label=label, num=num, cat=cats, first_line=int(lines[0]))


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


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
