"""Streaming reader for the Kaggle Avazu CTR CSV (id, click, hour, C1, ..., C21; 24 columns).

The header line may be present (Kaggle's train.csv) or absent (split files); it is
detected from the first line. The label is ``click``. Every other column except ``id``
is categorical, with ``hour`` (YYMMDDHH) replaced by ``hour_of_day`` (HH) and
``weekday`` (0 = Sunday .. 6 = Saturday, ``strftime('%w')``) as in FuxiCTR's Avazu
preprocessing. There are no numeric fields. Every problem names the file and the
1-based line: wrong column count, a click that is not 0/1, an hour that is not a valid
YYMMDDHH. With ``skip_bad_rows`` such rows are dropped and counted instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ctr_ensemble.data.readers.base import (ArrowRowErrors, RawBatch, ReadStats, TextParts, check_data_file,
                                            drop_bad_utf8, error_line, parsed_lines, read_head)
from ctr_ensemble.errors import CtrError

AVAZU_COLUMNS = [
    "id", "click", "hour", "C1", "banner_pos",
    "site_id", "site_domain", "site_category",
    "app_id", "app_domain", "app_category",
    "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
]  # fmt: skip
# Categorical fields in file order, with hour replaced in place by its two derived fields.
AVAZU_CAT_COLS = ["hour_of_day", "weekday"] + AVAZU_COLUMNS[3:]
_READ_ERRORS = (pa.ArrowInvalid, OSError, EOFError, UnicodeDecodeError)


def has_avazu_header(first_line: bytes) -> bool:
    return first_line.lstrip(b"\xef\xbb\xbf").startswith(b"id,click,")


class AvazuReader(ArrowRowErrors, TextParts):
    """Iterate an Avazu CSV file (plain or .gz) in chunks of about ``block_size`` bytes."""

    format = "avazu"
    label_name = "click"
    num_names: list[str] = []
    cat_names = AVAZU_CAT_COLS
    seq_name = None
    row_layout = "comma-separated columns (id, click, hour, C1, ..., C21)"

    @staticmethod
    def sniff(head: bytes) -> bool:
        """The Avazu header, or 23 commas and no tab (a headerless split file)."""
        return has_avazu_header(head) or (head.count(b",") == 23 and b"\t" not in head)

    def __init__(self, path: str | Path, skip_bad_rows: bool = False, block_size: int = 8 << 20):
        self.path = Path(path)
        self.block_size = block_size
        self.skip_bad_rows = skip_bad_rows
        self.stats = ReadStats()
        self._pending: CtrError | None = None
        self._invalid_lines: list[int] = []  # lines dropped by the parser in the current chunk
        check_data_file(self.path, "Avazu CSV rows: id, click, hour, C1, ..., C21")
        try:
            head = read_head(self.path)
        except _READ_ERRORS as e:
            raise CtrError(f"{self.path}: cannot read as Avazu CSV: {error_line(e)}") from e
        self.has_header = has_avazu_header(head)
        if self.has_header:
            cols = head.decode("utf-8", "replace").strip().lstrip("\ufeff").split(",")
            if cols != AVAZU_COLUMNS:
                raise CtrError(f"{self.path}:line 1: header is not the Avazu layout "
                               f"({','.join(AVAZU_COLUMNS[:4])},...,C21; 24 columns), got {len(cols)} columns: "
                               f"{','.join(cols[:6])}{',...' if len(cols) > 6 else ''}")

    def _bad(self, where: str, what: str, line: int | None = None) -> None:
        try:
            self.stats.bad_row(f"{self.path}:{where}: {what}", self.skip_bad_rows)
        except CtrError as err:
            err.line = line  # so the earliest of a chunk's errors can be raised first
            raise

    def __iter__(self) -> Iterator[RawBatch]:
        skip = 1 if self.has_header and (self._span is None or self._span.start == 0) else 0
        read_opts = pacsv.ReadOptions(column_names=AVAZU_COLUMNS, skip_rows=skip, block_size=self.block_size,
                                      use_threads=False)
        parse_opts = pacsv.ParseOptions(delimiter=",", quote_char=False, invalid_row_handler=self._on_invalid_row)
        conv = pacsv.ConvertOptions(column_types={c: pa.string() for c in AVAZU_COLUMNS}, strings_can_be_null=False,
                                    include_columns=AVAZU_COLUMNS[1:], check_utf8=False)  # checked by drop_bad_utf8
        try:
            source = self.path if self._span is None else pa.BufferReader(self._read_span())
            reader = pacsv.open_csv(source, read_options=read_opts, parse_options=parse_opts, convert_options=conv)
        except CtrError:
            raise
        except _READ_ERRORS as e:
            raise CtrError(f"{self.path}: cannot read as Avazu CSV: {error_line(e)}") from e
        # open_csv already parsed the first chunk: its dropped rows (and errors) belong to the first batch.
        line = 1 + skip + self._line_offset
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                self._raise_pending()
                break
            except CtrError:
                raise
            except _READ_ERRORS as e:
                raise CtrError(f"{self.path}: near line {line}: cannot parse: {error_line(e)}") from e
            pending, self._pending = self._pending, None
            invalid, self._invalid_lines = self._invalid_lines, []
            n_rows = batch.num_rows
            try:
                batch, kept = drop_bad_utf8(batch, parsed_lines(line, n_rows, invalid),
                                            lambda ln, name, why: self._bad(f"line {ln}, field {name}", why, ln))
                out = self._convert(batch, kept)
            except CtrError as e:
                # Raise whichever problem comes first in the file: a column-count one or a value one.
                p_line = getattr(pending, "line", None)
                if pending is not None and p_line is not None and p_line < getattr(e, "line", 1 << 62):
                    raise pending from None
                raise
            if pending is not None:
                raise pending
            line += n_rows + len(invalid)
            if out is not None:
                self.stats.rows += len(out.label)
                yield out

    def _convert(self, batch: pa.RecordBatch, lines: np.ndarray) -> RawBatch | None:
        n = batch.num_rows
        if n == 0:
            return None
        first_line = int(lines[0])
        keep = np.ones(n, dtype=bool)
        click = batch.column("click")
        ok = pc.is_in(click, value_set=pa.array(["0", "1"])).to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(~ok):
            self._bad(f"line {lines[i]}", f"click must be 0 or 1, got {click[i].as_py()!r}", int(lines[i]))
            keep[i] = False
        label = (click.to_numpy(zero_copy_only=False) == "1").astype(np.int64)

        hour = batch.column("hour")
        # Derive per distinct hour value (a day has 24), then map back with index_in.
        uniq = pc.unique(hour).to_pylist()
        hh, wd, bad = [], [], {}
        for u in uniq:
            d = _parse_hour(u)
            if d is None:
                bad[u] = True
                hh.append("")
                wd.append("")
            else:
                hh.append(u[6:8])
                wd.append(d.strftime("%w"))
        pos = pc.index_in(hour, value_set=pa.array(uniq, pa.string()))
        hour_of_day = pc.take(pa.array(hh, pa.string()), pos)
        weekday = pc.take(pa.array(wd, pa.string()), pos)
        if bad:
            bad_rows = pc.is_in(hour, value_set=pa.array(list(bad), pa.string())).to_numpy(zero_copy_only=False)
            for i in np.flatnonzero(bad_rows & keep):
                self._bad(f"line {lines[i]}, field hour",
                          f"expected YYMMDDHH (8 digits, a valid date and hour), got {hour[i].as_py()!r}",
                          int(lines[i]))
                keep[i] = False

        cats = [hour_of_day, weekday] + [batch.column(name) for name in AVAZU_COLUMNS[3:]]
        if not keep.all():
            if not keep.any():
                return None
            mask = pa.array(keep)
            label = label[keep]
            cats = [pc.filter(c, mask) for c in cats]
        return RawBatch(label=label, num=np.empty((len(label), 0), dtype=np.float64), cat=cats,
                        first_line=first_line)


def _parse_hour(s: str) -> date | None:
    if len(s) != 8 or not s.isascii() or not s.isdigit():
        return None
    try:
        d = date(2000 + int(s[0:2]), int(s[2:4]), int(s[4:6]))
    except ValueError:
        return None
    return d if int(s[6:8]) < 24 else None

