"""Streaming reader for Criteo-layout TSV (label, I1..I13, C1..C26; no header), and the home of that layout.

Files of any size are read in chunks with pyarrow's streaming CSV reader. Every
problem names the file and the 1-based line: a row with the wrong number of
columns, a label that is not 0/1, a numeric field that is not a number, a field
that is not UTF-8 text. With ``skip_bad_rows`` such rows are dropped and counted
instead of raising.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ctr_ensemble.data.readers.base import (ArrowRowErrors, RawBatch, ReadStats, TextParts, check_data_file,
                                            drop_bad_utf8, error_line, parsed_lines)
from ctr_ensemble.errors import CtrError

# The Criteo display-advertising layout (also what ``data synth`` writes): label, I1..I13 numeric, C1..C26 categorical.
N_NUM = 13
N_CAT = 26
LABEL = "label"
NUM_COLS = [f"I{i}" for i in range(1, N_NUM + 1)]
CAT_COLS = [f"C{i}" for i in range(1, N_CAT + 1)]
COLUMNS = [LABEL, *NUM_COLS, *CAT_COLS]


class CriteoReader(ArrowRowErrors, TextParts):
    """Iterate a Criteo-layout TSV file in chunks of about ``block_size`` bytes."""

    format = "criteo"
    label_name = LABEL
    num_names = NUM_COLS
    cat_names = CAT_COLS
    seq_name = None
    row_layout = "tab-separated columns (label, I1..I13, C1..C26)"

    def __init__(self, path: str | Path, block_size: int = 8 << 20, skip_bad_rows: bool = False):
        self.path = Path(path)
        self.block_size = block_size
        self.skip_bad_rows = skip_bad_rows
        self.stats = ReadStats()
        self._pending: CtrError | None = None
        self._invalid_lines: list[int] = []  # lines the parser dropped (-1: unknown), so later line numbers stay right
        check_data_file(self.path, "Criteo TSV rows: label, I1..I13, C1..C26")

    def _bad(self, where: str, what: str, line: int | None = None) -> None:
        self.stats.bad_row(f"{self.path}:{where}: {what}", self.skip_bad_rows)

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
            raise CtrError(f"{self.path}: cannot read as Criteo TSV: {error_line(e)}") from e
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
                raise CtrError(f"{self.path}: near line {line}: cannot parse: {error_line(e)}") from e
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
