"""Streaming reader for libSVM / libFM / FFM text with one token per field (iPinYou, Frappe).

Each line is ``label idx:val idx:val ...`` (libSVM/libFM) or ``label field:idx:val ...``
(FFM), whitespace-separated, plain or gzip-compressed. The label is 1 or 0; -1 (and
decimal forms such as 1.0, 0.0, -1.0) are accepted, -1 meaning 0. The number of fields
is fixed by the first valid line; field k (named ``f{k}``) is the k-th token and its
categorical value is the ``idx`` string (the ``field:`` prefix of FFM is ignored, and so
is ``val``, which must still be a number). There are no numeric fields. Blank lines are
ignored. Every problem names the file and the 1-based line: a wrong token count, a bad
label, a token that is not ``idx:val`` (or ``field:idx:val``). With ``skip_bad_rows``
such lines are dropped and counted instead.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctr_ensemble.data.readers.base import RawBatch, ReadStats, TextParts, check_data_file, error_line
from ctr_ensemble.errors import CtrError

_NUM = r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_LABEL_RE = r"^(?:\+?1|-1|[+-]?0)(?:\.0*)?$"
_TOKEN_RE = {2: rf"^[^:]+:{_NUM}$", 3: rf"^[^:]+:[^:]+:{_NUM}$"}  # libSVM idx:val / FFM field:idx:val
_HEAD_TOKEN = re.compile(rb"^[^:\s]+(:[^:\s]+){1,2}$")  # a token's shape, for format detection
_WS = re.compile(r"[ \t\n\r\f\v]+")  # ASCII whitespace, as pyarrow's ascii_split_whitespace
_PEEK_LINES = 1000  # lines scanned at open for the first valid one
_READ_ERRORS = (OSError, EOFError, UnicodeDecodeError, zlib.error)


class LibSVMReader(TextParts):
    """Iterate a libSVM/libFM/FFM file (plain or .gz) in chunks of about ``block_size`` bytes."""

    format = "libsvm"
    suffixes = (".svm", ".libsvm", ".libfm", ".ffm")
    label_name = "label"
    num_names: list[str] = []
    seq_name = None

    @staticmethod
    def sniff(head: bytes) -> bool:
        """``label idx:val ...`` (or ``field:idx:val``) with a 0/1 label and no tab."""
        toks = head.split()
        return (len(toks) >= 2 and b"\t" not in head.strip() and re.match(rb"^[+-]?[01](\.0*)?$", toks[0]) is not None
                and all(_HEAD_TOKEN.match(t) for t in toks[1:]))

    def __init__(self, path: str | Path, skip_bad_rows: bool = False, block_size: int = 8 << 20):
        self.path = Path(path)
        self.block_size = block_size
        self.skip_bad_rows = skip_bad_rows
        self.stats = ReadStats()
        check_data_file(self.path, "libSVM lines: label idx:val idx:val ...")
        self.n_fields, self.parts = self._peek()
        self.cat_names = [f"f{k}" for k in range(1, self.n_fields + 1)]

    def _peek(self) -> tuple[int, int]:
        """Token count and token form (2 = idx:val, 3 = field:idx:val) of the first valid line."""
        first_err = None
        try:
            with self._open() as f:
                for lineno, raw in enumerate(f, 1):
                    if lineno > _PEEK_LINES:
                        break
                    toks = [t for t in _WS.split(raw.decode("utf-8")) if t]
                    if not toks:
                        continue
                    err = _check_label(toks[0])
                    parts = toks[1].count(":") + 1 if len(toks) > 1 else 0
                    if err is None and parts not in _TOKEN_RE:
                        err = (f"token 1 (field f1) must be idx:val or field:idx:val, got {toks[1]!r}"
                               if len(toks) > 1 else "no feature tokens after the label")
                    if err is None:
                        err = _check_tokens(toks[1:], parts)
                    if err is None:
                        return len(toks) - 1, parts
                    first_err = first_err or f"{self.path}:line {lineno}: {err}"
        except _READ_ERRORS as e:
            raise CtrError(f"{self.path}: cannot read as libSVM text: {error_line(e)}") from e
        if first_err is None:
            raise CtrError(f"{self.path}: no data lines (expected libSVM lines: label idx:val idx:val ...)")
        raise CtrError(f"no valid line among the first {_PEEK_LINES} lines; first problem: {first_err}")

    def _bad(self, where: str, what: str) -> None:
        self.stats.bad_row(f"{self.path}:{where}: {what}", self.skip_bad_rows)

    def __iter__(self) -> Iterator[RawBatch]:
        for lines, line in self._line_blocks():
            try:
                text = [raw.decode("utf-8") for raw in lines]
            except UnicodeDecodeError:
                text = []
                for i, raw in enumerate(lines):
                    try:
                        text.append(raw.decode("utf-8"))
                    except UnicodeDecodeError as e:
                        self._bad(f"line {line + i}", f"not UTF-8 text: {error_line(e)}")
                        text.append("")
            out = self._convert(text, line)
            if out is not None:
                self.stats.rows += len(out.label)
                yield out

    def _convert(self, lines: list[str], first_line: int) -> RawBatch | None:
        n_f = self.n_fields
        trimmed = pc.ascii_trim_whitespace(pa.array(lines, pa.string()))
        toks = pc.ascii_split_whitespace(trimmed)
        data = ~pc.equal(trimmed, "").to_numpy(zero_copy_only=False)  # blank lines are ignored
        lens = np.where(data, pc.list_value_length(toks).to_numpy(zero_copy_only=False), 0)
        keep = lens == n_f + 1
        # Rows with the right token count: label and token syntax checked (and idx extracted) vectorised,
        # then the bad rows explained one by one.
        idx = np.flatnonzero(keep)
        flat = pc.list_flatten(pc.take(toks, pa.array(idx, pa.int64())))  # (len(idx) * (n_f + 1),)
        pos = np.arange(len(idx) * (n_f + 1)).reshape(len(idx), n_f + 1)
        labels = pc.take(flat, pa.array(pos[:, 0]))
        feats = pc.take(flat, pa.array(pos[:, 1:].ravel()))
        tok_ok = pc.match_substring_regex(feats, _TOKEN_RE[self.parts]).to_numpy(zero_copy_only=False)
        tok_ok = tok_ok.reshape(len(idx), n_f).all(axis=1)
        row_ok = tok_ok & pc.match_substring_regex(labels, _LABEL_RE).to_numpy(zero_copy_only=False)
        keep[idx[~row_ok]] = False
        for i in np.flatnonzero(data & ~keep):
            t = _WS.split(lines[i].strip(" \t\n\r\f\v"))
            if len(t) != n_f + 1:
                self._bad(f"line {first_line + i}", f"expected a label and {n_f} tokens (fixed by the first valid "
                                                    f"line), got {len(t) - 1} tokens")
            else:
                self._bad(f"line {first_line + i}", _check_label(t[0]) or _check_tokens(t[1:], self.parts)
                          or "malformed line")
        if not row_ok.any():
            return None
        b = int(row_ok.sum())
        rows = np.flatnonzero(row_ok)
        lab = pc.cast(pc.take(labels, pa.array(rows)), pa.float64()).to_numpy(zero_copy_only=False)
        label = (lab > 0.5).astype(np.int64)
        # idx is the first (libSVM) or second (FFM) ':'-separated part of each token.
        keys = pc.list_element(pc.split_pattern(feats, ":", max_splits=self.parts - 1), self.parts - 2)
        # keys is row-major (row, field): field k of the kept rows is at rows * n_f + k.
        cats = [pc.take(keys, pa.array(rows * n_f + k)) for k in range(n_f)]
        return RawBatch(label=label, num=np.empty((b, 0), dtype=np.float64), cat=cats, first_line=first_line)


def _check_label(tok: str) -> str | None:
    if re.match(_LABEL_RE, tok):
        return None
    return f"label must be 1 or 0 (or -1 for 0), got {tok!r}"


def _check_tokens(toks: list[str], parts: int) -> str | None:
    pat = re.compile(_TOKEN_RE[parts])
    form = "idx:val" if parts == 2 else "field:idx:val"
    for k, t in enumerate(toks, 1):
        if not pat.match(t):
            return f"token {k} (field f{k}) must be {form} with a numeric val, got {t!r}"
    return None

