"""Streaming reader for JSON Lines (``.jsonl`` / ``.ndjson``): one JSON object per line, plain or gzip-compressed.

The fields and their roles come from the values, like Parquet's from its schema, over the first lines
(the first ``_PEEK_LINES``), in the order the keys first appear:

* the label: the key named by ``label=`` (default ``label``, else ``click``); 0 or 1 (``0.0``/``1.0``,
  ``true``/``false`` or ``"0"``/``"1"`` too);
* a string → categorical; a number (or ``true``/``false``) → numeric; a key only ever ``null`` there →
  categorical;
* one list of strings or integers → the behaviour sequence, items as strings (with several, choose with
  ``sequence=``);
* an object value → ignored, listed in ``reader.ignored``.

On any line, ``null`` or an absent key is a missing value ("" / NaN; an empty history), blank lines are
ignored. Every problem names the file and the 1-based line (and the key): not a JSON object, a bad or
missing label, a value of another role than the key's (a number in a categorical key: quote ids), a key
not seen in the first lines, text that is not UTF-8. With ``skip_bad_rows`` such lines are dropped and
counted instead.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from ctr_ensemble.data.readers.base import RawBatch, ReadStats, TextParts, check_data_file, error_line, label_name
from ctr_ensemble.errors import CtrError

_PEEK_LINES = 1000  # lines scanned at open for the keys and their roles
_READ_ERRORS = (OSError, EOFError, zlib.error)
_LABELS = {0: 0, 1: 1, "0": 0, "1": 1}  # True == 1 and 0.0 == 0 hash alike, so bools and floats match too
CAT, NUM, SEQ, IGNORED = "categorical", "numeric", "sequence", "ignored"


def _role(v) -> str | None:
    """The role a (non-null) JSON value gives its key."""
    if isinstance(v, str):
        return CAT
    if isinstance(v, (bool, int, float)):
        return NUM
    if isinstance(v, list):
        return SEQ
    return IGNORED


def _label(v) -> int | None:
    return _LABELS.get(v) if isinstance(v, (bool, int, float, str)) else None


class JSONLReader(TextParts):
    """Iterate a JSON Lines file (plain or .gz) in chunks of about ``block_size`` bytes."""

    format = "jsonl"
    suffixes = (".jsonl", ".ndjson")

    @staticmethod
    def sniff(head: bytes) -> bool:
        """A first line that is a JSON object (or, cut at 4096 bytes, starts like one)."""
        text = head.lstrip(b"\xef\xbb\xbf").strip()
        return text.startswith(b"{") and (text.endswith(b"}") or len(head) >= 4096)

    def __init__(self, path: str | Path, skip_bad_rows: bool = False, label: str | None = None,
                 sequence: str | None = None, block_size: int = 8 << 20):
        self.path = Path(path)
        self.block_size = block_size
        self.skip_bad_rows = skip_bad_rows
        self.stats = ReadStats()
        check_data_file(self.path, "JSON Lines: one object per line with a label (or click) key")
        roles = self._peek()
        label = label_name(list(roles), label, self.path, "key")
        seqs = [k for k, r in roles.items() if r == SEQ and k != label]
        if sequence is not None and sequence not in seqs:
            raise CtrError(f"{self.path}: sequence key {sequence!r} does not hold lists; list keys: {seqs}")
        if sequence is None and len(seqs) > 1:
            raise CtrError(f"{self.path}: several list keys {seqs} could be the behaviour sequence; "
                           "choose one with sequence=...")
        sequence = sequence or (seqs[0] if seqs else None)
        self.label_name, self.seq_name = label, sequence
        self.cat_names = [k for k, r in roles.items() if r == CAT and k != label]
        self.num_names = [k for k, r in roles.items() if r == NUM and k != label]
        self.ignored = [k for k, r in roles.items() if (r == IGNORED or r == SEQ) and k not in (label, sequence)]
        self._roles = {k: r for k, r in roles.items() if k not in self.ignored}

    def _peek(self) -> dict[str, str]:
        """Each key of the first valid lines → its role (from its first non-null value)."""
        roles: dict[str, str | None] = {}
        first_err, valid = None, 0
        try:
            with self._open() as f:
                for lineno, raw in enumerate(f, 1):
                    if lineno > _PEEK_LINES:
                        break
                    obj, err = _parse(raw, lineno)
                    if err is not None:
                        first_err = first_err or f"{self.path}:line {lineno}: {err}"
                    if obj is None:
                        continue
                    for k, v in obj.items():
                        if roles.get(k) is None:
                            roles[k] = None if v is None else _role(v)
                    valid += 1
        except _READ_ERRORS as e:
            raise CtrError(f"{self.path}: cannot read as JSON Lines: {error_line(e)}") from e
        if not valid:
            if first_err is None:
                raise CtrError(f"{self.path}: no data lines (expected one JSON object per line)")
            raise CtrError(f"no JSON object among the first {_PEEK_LINES} lines; first problem: {first_err}")
        return {k: r or CAT for k, r in roles.items()}

    def _bad(self, where: str, what: str) -> None:
        self.stats.bad_row(f"{self.path}:{where}: {what}", self.skip_bad_rows)

    def __iter__(self) -> Iterator[RawBatch]:
        for lines, line in self._line_blocks():
            out = self._convert(lines, line)
            if out is not None:
                self.stats.rows += len(out.label)
                yield out

    def _convert(self, lines: list[bytes], first_line: int) -> RawBatch | None:
        labels, nums, cats, seqs, first = [], [], {k: [] for k in self.cat_names}, [], None
        for i, raw in enumerate(lines):
            lineno = first_line + i
            obj, err = _parse(raw, lineno)
            if err is not None:
                self._bad(f"line {lineno}", err)
            if obj is None:
                continue
            row = self._row(obj, lineno)
            if row is None:
                continue
            first = lineno if first is None else first
            labels.append(row[0])
            nums.append(row[1])
            for k, v in zip(self.cat_names, row[2]):
                cats[k].append(v)
            seqs.append(row[3])
        if not labels:
            return None
        num = np.array(nums, dtype=np.float64).reshape(len(labels), len(self.num_names))
        seq = pa.array(seqs, pa.list_(pa.string())) if self.seq_name else None
        return RawBatch(label=np.array(labels, dtype=np.int64), num=num,
                        cat=[pa.array(cats[k], pa.string()) for k in self.cat_names], first_line=first, seq=seq)

    def _row(self, obj: dict, lineno: int):
        """(label, numerics, categoricals, history) of one object, or None after reporting why it is bad."""
        unknown = [k for k in obj if k not in self._roles and k not in self.ignored]
        if unknown:
            self._bad(f"line {lineno}", f"key(s) {unknown} not in the first lines' keys {list(self._roles)}")
            return None
        label = _label(obj.get(self.label_name))
        if label is None:
            self._bad(f"line {lineno}, field {self.label_name}",
                      f"label must be 0 or 1, got {json.dumps(obj.get(self.label_name))[:40]}")
            return None
        num, cat, seq = [], [], []
        for k, role in self._roles.items():
            v = obj.get(k)
            if k == self.label_name:
                continue
            if v is not None and _role(v) != role:
                self._bad(f"line {lineno}, field {k}", f"expected a {_EXPECTED[role]} ({role}), got "
                                                       f"{json.dumps(v)[:40]}")
                return None
            if role == NUM:
                num.append(math.nan if v is None else float(v))
            elif role == CAT:
                cat.append("" if v is None else v)
            else:
                items = v or []
                if not all(x is None or (isinstance(x, (str, int)) and not isinstance(x, bool)) for x in items):
                    self._bad(f"line {lineno}, field {k}", "history items must be strings or integers, got "
                                                           f"{json.dumps(items)[:40]}")
                    return None
                seq = ["" if x is None else str(x) for x in items]
        return label, num, cat, seq


_EXPECTED = {CAT: "string", NUM: "number", SEQ: "list"}


def _parse(raw: bytes, lineno: int) -> tuple[dict | None, str | None]:
    """(the line's object, None), (None, None) for a blank line, or (None, what is wrong with it)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text: {error_line(e)}"
    text = text.lstrip("\ufeff") if lineno == 1 else text
    if not text.strip():
        return None, None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON: {e.msg} at column {e.colno}"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    return obj, None
