"""Streaming reader for Parquet files (one file, or a folder of ``*.parquet`` files).

Field roles come from the Arrow schema:

* the label: the column named by ``label=`` (default ``label``, else ``click``); integer,
  float or bool values in {0, 1} (or strings "0"/"1");
* string / large_string / dictionary columns → categorical (null → "");
  ``categorical=[...]`` forces named integer (or other) columns to categorical, cast to string;
* integer / float / bool columns → numeric (null → NaN);
* one ``list<string>`` or ``list<int>`` column → the behaviour sequence, items cast to strings
  (null list → empty); with several, choose with ``sequence=``;
* columns of other types (timestamps, dates, binary, structs, ...) and those named in
  ``exclude=`` are ignored and listed in ``reader.ignored``.

Batches come from ``pyarrow.parquet.ParquetFile(...).iter_batches``. Problems name the file
and the 1-based row within it ("row N"); with ``skip_bad_rows`` bad rows are dropped and counted.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ctr_ensemble.data.readers.base import RawBatch, Reader, ReadStats, Span, error_line, label_name
from ctr_ensemble.errors import CtrError

_READ_ERRORS = (pa.ArrowException, OSError, EOFError)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


class ParquetReader(Reader):
    """Iterate a Parquet file or folder of Parquet files in batches of ``batch_size`` rows."""

    format = "parquet"
    folders = True
    suffixes = (".parquet",)
    magic = b"PAR1"
    _span: Span | None = None  # set by ``part``: some row groups of one file

    def __init__(self, path: str | Path, skip_bad_rows: bool = False, label: str | None = None,
                 categorical: Sequence[str] = (), sequence: str | None = None, exclude: Sequence[str] = (),
                 batch_size: int = 65536):
        self.path = Path(path)
        self.skip_bad_rows = skip_bad_rows
        self.batch_size = batch_size
        self.stats = ReadStats()
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.rglob("*.parquet") if p.is_file())
            if not self.files:
                raise CtrError(f"{self.path}: folder has no *.parquet files")
        elif self.path.is_file():
            self.files = [self.path]
        else:
            raise CtrError(f"{self.path}: data file not found")
        for f in self.files:
            if f.stat().st_size == 0:
                raise CtrError(f"{f}: data file is empty (expected a Parquet file)")
        schema = self._schema(self.files[0])
        for f in self.files[1:]:
            other = self._schema(f)
            if not other.remove_metadata().equals(schema.remove_metadata()):
                raise CtrError(f"{f}: schema differs from {self.files[0].name} in the same folder: "
                               f"{_schema_str(other)} vs {_schema_str(schema)}")
        self.schema = schema
        self._roles(schema, label, list(categorical), sequence, list(exclude))

    def _schema(self, f: Path) -> pa.Schema:
        try:
            return pq.read_schema(f)
        except _READ_ERRORS as e:
            raise CtrError(f"{f}: cannot read as Parquet: {error_line(e)}") from e

    def _roles(self, schema: pa.Schema, label: str | None, categorical: list[str], sequence: str | None,
               exclude: list[str]) -> None:
        names = schema.names
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise CtrError(f"{self.files[0]}: duplicate column names {dup}")
        for what, given in (("categorical", categorical), ("exclude", exclude),
                            ("sequence", [sequence] if sequence else [])):
            missing = [c for c in given if c not in names]
            if missing:
                raise CtrError(f"{self.files[0]}: {what} column(s) {missing} not in the file; columns: {names}")
        label = label_name(names, label, self.files[0])
        lt = schema.field(label).type
        if not (_is_numeric(lt) or _is_string(lt)):
            raise CtrError(f"{self.files[0]}: label column {label!r} has type {lt}; expected integer, float, bool "
                           f"or string 0/1")
        self.label_name = label
        num, cat, seqs, ignored = [], [], [], []
        for fld in schema:
            name, t = fld.name, fld.type
            if name == label or name in exclude:
                continue
            if name in categorical:
                if _is_list(t) or pa.types.is_struct(t) or pa.types.is_map(t):
                    raise CtrError(f"{self.files[0]}: column {name!r} of type {t} cannot be categorical")
                cat.append(name)
            elif _is_string(t) or pa.types.is_dictionary(t):
                cat.append(name)
            elif _is_numeric(t):
                num.append(name)
            elif _is_list(t) and (_is_string(t.value_type) or pa.types.is_integer(t.value_type)):
                seqs.append(name)
            else:
                ignored.append((name, str(t)))
        if sequence is not None:
            if sequence not in seqs:
                raise CtrError(f"{self.files[0]}: sequence column {sequence!r} must be list<string> or list<int>, "
                               f"got {schema.field(sequence).type}")
            ignored += [(s, str(schema.field(s).type)) for s in seqs if s != sequence]
        elif len(seqs) > 1:
            raise CtrError(f"{self.files[0]}: several list columns {seqs} could be the behaviour sequence; "
                           f"choose one with sequence=...")
        else:
            sequence = seqs[0] if seqs else None
        self.num_names, self.cat_names, self.seq_name, self.ignored = num, cat, sequence, ignored
        self._columns = [label, *num, *cat, *([sequence] if sequence else [])]

    def _bad(self, f: Path, where: str, what: str) -> None:
        self.stats.bad_row(f"{f}:{where}: {what}", self.skip_bad_rows)

    def part(self, span: Span) -> "ParquetReader":
        """A reader over some row groups of one of this reader's files (same roles)."""
        if Path(span.file) not in self.files:
            raise ValueError(f"span of {span.file} given to the reader of {self.path}")
        other = copy.copy(self)
        other.stats = ReadStats()
        other.files = [Path(span.file)]
        other._span = span
        return other

    def spans(self, chunk_bytes: int) -> list[tuple[Span, int]]:
        """Per file, runs of row groups of about ``chunk_bytes`` (uncompressed row-group bytes)."""
        spans = []
        for f in self.files:
            rows = self.row_groups(f)
            md = pq.ParquetFile(f).metadata
            sizes = [md.row_group(i).total_byte_size for i in range(md.num_row_groups)]
            group, acc, first = [], 0, 1
            for g, (n, b) in enumerate(zip(rows, sizes)):
                group.append(g)
                acc += b
                if acc >= chunk_bytes or g == len(rows) - 1:
                    spans.append((Span(str(f), first_line=first, row_groups=tuple(group)), acc))
                    first += sum(rows[k] for k in group)
                    group, acc = [], 0
        return spans

    def row_groups(self, f: Path) -> list[int]:
        """Rows per row group of file ``f``."""
        try:
            md = pq.ParquetFile(f).metadata
        except _READ_ERRORS as e:
            raise CtrError(f"{f}: cannot read as Parquet: {error_line(e)}") from e
        return [md.row_group(i).num_rows for i in range(md.num_row_groups)]

    def __iter__(self) -> Iterator[RawBatch]:
        for f in self.files:
            try:
                pf = pq.ParquetFile(f)
            except _READ_ERRORS as e:
                raise CtrError(f"{f}: cannot read as Parquet: {error_line(e)}") from e
            row = 1 if self._span is None else self._span.first_line
            groups = list(self._span.row_groups) if self._span is not None else None
            it = pf.iter_batches(batch_size=self.batch_size, columns=self._columns, use_threads=False,
                                 row_groups=groups)
            while True:
                try:
                    batch = next(it)
                except StopIteration:
                    break
                except _READ_ERRORS as e:
                    raise CtrError(f"{f}: near row {row}: cannot read: {error_line(e)}") from e
                out = self._convert(f, batch, row)
                row += batch.num_rows
                if out is not None:
                    self.stats.rows += len(out.label)
                    yield out

    def _convert(self, f: Path, batch: pa.RecordBatch, first_row: int) -> RawBatch | None:
        n = batch.num_rows
        if n == 0:
            return None
        keep = np.ones(n, dtype=bool)
        col = batch.column(self.label_name)
        if _is_string(col.type):
            ok = pc.fill_null(pc.is_in(col, value_set=pa.array(["0", "1"])), False).to_numpy(zero_copy_only=False)
            label = pc.fill_null(pc.equal(col, "1"), False).to_numpy(zero_copy_only=False).astype(np.int64)
        else:
            v = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)  # nulls → NaN
            ok = (v == 0) | (v == 1)
            label = np.where(ok, v, 0).astype(np.int64)
        for i in np.flatnonzero(~ok):
            self._bad(f, f"row {first_row + i}", f"label {self.label_name!r} must be 0 or 1, got {col[i].as_py()!r}")
            keep[i] = False
        num = np.empty((n, len(self.num_names)), dtype=np.float64)
        for j, name in enumerate(self.num_names):
            num[:, j] = pc.cast(batch.column(name), pa.float64()).to_numpy(zero_copy_only=False)
        cats = [_to_string(batch.column(name)) for name in self.cat_names]
        seq = _to_string_lists(batch.column(self.seq_name)) if self.seq_name else None
        if not keep.all():
            if not keep.any():
                return None
            mask = pa.array(keep)
            label, num = label[keep], num[keep]
            cats = [pc.filter(c, mask) for c in cats]
            seq = pc.filter(seq, mask) if seq is not None else None
        return RawBatch(label=label, num=num, cat=cats, first_line=first_row, seq=seq)


def _to_string(col: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if not pa.types.is_string(col.type):
        col = pc.cast(col, pa.string())
    return pc.fill_null(col, "") if col.null_count else col


def _to_string_lists(col: pa.Array) -> pa.Array:
    """list<string|int> → list<string>; null lists become empty, null items ""."""
    if col.null_count:
        col = pa.array([v if v is not None else [] for v in col.to_pylist()], col.type)
    values = _to_string(col.flatten())
    off = col.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    off = (off - off[0]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(off, pa.int32()), values)


def _schema_str(s: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in s)

