"""Encoding raw rows with a feature spec: the one home of ``Encoder``, ``Arrays`` (encoded rows in memory) and
``encode_file``.

A categorical token becomes its vocabulary id (OOV 0); numerics stay raw float32 (NaN = missing; the model
transforms them); a behaviour sequence keeps its ``max_len`` most recent items, left-aligned and
zero-padded, with their count. Shapes: ``cat_ids`` (B, n_cat) int64, ``num`` (B, n_num) float32, ``seq_ids``
(B, max_len) int64, ``seq_len`` (B, 1) int64; rows with an empty history have ``seq_len`` 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ctr_ensemble.data.readers import open_reader
from ctr_ensemble.data.readers.base import RawBatch, list_lengths
from ctr_ensemble.data.spec import OOV_ID, FeatureSpec
from ctr_ensemble.errors import CtrError


def window_sequence(flat: np.ndarray, lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows' items laid end to end (``flat``, rows in order, each oldest first) with their ``lengths`` (B,) →
    (B, max_len) of the ``max_len`` most recent items of each row, left-aligned and zero-padded (dtype of
    ``flat``), and the kept lengths (B, 1) int64."""
    lengths = lengths.astype(np.int64)
    off = np.concatenate([[0], np.cumsum(lengths)])
    keep = np.minimum(lengths, max_len)
    start = off[:-1] + lengths - keep  # drop the oldest items beyond max_len
    pos = np.arange(max_len)
    valid = pos[None, :] < keep[:, None]
    src = np.where(valid, start[:, None] + pos[None, :], 0)
    ids = np.where(valid, flat[src] if len(flat) else 0, 0).astype(flat.dtype)
    return ids, keep[:, None]


class Encoder:
    """Turns raw batches into model inputs: ``cat_ids`` (B, n_cat) int64, ``num`` (B, n_num) float32,
    and with a sequence field ``seq_ids`` (B, max_len) int64 + ``seq_len`` (B, 1) int64."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self._vocab = [pa.array(f.vocab, type=pa.string()) for f in spec.categorical]
        self._seq_vocab = pa.array(spec.sequence.vocab, type=pa.string()) if spec.sequence else None

    @property
    def vocab_arrays(self) -> list[pa.Array]:
        """Per categorical field, its vocabulary as an Arrow string array (token at position i has id i + 1)."""
        return self._vocab

    @property
    def seq_vocab_array(self) -> pa.Array | None:
        return self._seq_vocab

    def check_fields(self, reader, source: str) -> None:
        """The file's fields must be the spec's, in the same order."""
        got = (list(reader.cat_names), list(reader.num_names))
        want = ([f.name for f in self.spec.categorical], [f.name for f in self.spec.numeric])
        if got != want:
            raise CtrError(f"{source}: fields do not match the feature spec: file has categorical {got[0]} and "
                           f"numeric {got[1]}, the spec expects categorical {want[0]} and numeric {want[1]}")
        if self.spec.sequence is not None and reader.seq_name != self.spec.sequence.name:
            raise CtrError(f"{source}: the feature spec has the behaviour sequence {self.spec.sequence.name!r}, "
                           f"the file has {'no sequence column' if reader.seq_name is None else repr(reader.seq_name)}")

    def encode_sequence(self, seq: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """list<string> (B,) → seq_ids (B, max_len) int64 (most recent ``max_len`` items, oldest first,
        zero-padded on the right), seq_len (B, 1) int64."""
        values = seq.flatten()  # honours a sliced array's offset
        idx = pc.index_in(values, value_set=self._seq_vocab)
        flat = pc.fill_null(pc.add(idx, 1), OOV_ID).to_numpy(zero_copy_only=False).astype(np.int64)
        return window_sequence(flat, list_lengths(seq), self.spec.sequence.max_len)

    def encode(self, batch: RawBatch) -> tuple[np.ndarray, np.ndarray]:
        if len(batch.cat) != self.spec.n_cat or batch.num.shape[1] != self.spec.n_num:
            raise CtrError(
                f"data has {len(batch.cat)} categorical and {batch.num.shape[1]} numeric fields, "
                f"the feature spec expects {self.spec.n_cat} and {self.spec.n_num}"
            )
        ids = np.empty((len(batch.label), self.spec.n_cat), dtype=np.int64)
        for f, (col, vocab) in enumerate(zip(batch.cat, self._vocab)):
            idx = pc.index_in(col, value_set=vocab)
            ids[:, f] = pc.fill_null(pc.add(idx, 1), OOV_ID).to_numpy(zero_copy_only=False)
        return ids, batch.num.astype(np.float32)


@dataclass
class Arrays:
    """Encoded rows held in memory: cat_ids (N, n_cat) int64, num (N, n_num) float32, label (N,) float32,
    and with a sequence field seq_ids (N, L) int64 + seq_len (N, 1) int64."""

    cat_ids: np.ndarray
    num: np.ndarray
    label: np.ndarray
    skipped: int = 0  # malformed rows skipped while reading (skip_bad_rows)
    seq_ids: np.ndarray | None = None
    seq_len: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.label)

    def feeds(self, rows: slice | np.ndarray = slice(None)) -> dict[str, np.ndarray]:
        """Model inputs by name for ``rows`` (what ONNX Runtime, Triton and ``predict`` take): ``num`` is
        left out without numeric fields, ``seq_ids``/``seq_len`` without a sequence field."""
        out = {"cat_ids": self.cat_ids[rows]}
        if self.num.shape[1]:
            out["num"] = self.num[rows]
        if self.seq_ids is not None:
            out["seq_ids"], out["seq_len"] = self.seq_ids[rows], self.seq_len[rows]
        return out

    def take(self, rows: slice | np.ndarray) -> "Arrays":
        """A subset of the rows (a view for a slice)."""
        seq = (None, None) if self.seq_ids is None else (self.seq_ids[rows], self.seq_len[rows])
        return Arrays(self.cat_ids[rows], self.num[rows], self.label[rows], self.skipped, *seq)

    @staticmethod
    def concat(parts: "list[Arrays]") -> "Arrays":
        """The rows of ``parts`` one after the other (e.g. train + val for a refit); all need the same columns."""
        if len({p.seq_ids is None for p in parts}) > 1 or len({p.cat_ids.shape[1] for p in parts}) > 1:
            raise CtrError("cannot concatenate encoded rows of different feature specs")
        seq = (None, None) if parts[0].seq_ids is None else (
            np.concatenate([p.seq_ids for p in parts]), np.concatenate([p.seq_len for p in parts]))
        return Arrays(np.concatenate([p.cat_ids for p in parts]), np.concatenate([p.num for p in parts]),
                      np.concatenate([p.label for p in parts]), sum(p.skipped for p in parts), *seq)


def encode_file(path: str | Path, spec: FeatureSpec, skip_bad_rows: bool = False, fmt: str = "auto") -> Arrays:
    """Read and encode a whole file (any supported format) into memory."""
    reader = open_reader(path, fmt, skip_bad_rows)
    enc = Encoder(spec)
    enc.check_fields(reader, str(path))
    parts = []
    for b in reader:
        seq = enc.encode_sequence(b.seq) if spec.sequence is not None else ()
        parts.append((*enc.encode(b), b.label, *seq))
    if not parts:
        raise CtrError(f"{path}: no valid rows")
    cols = [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
    cols[2] = cols[2].astype(np.float32)
    return Arrays(*cols[:3], reader.stats.skipped, *cols[3:])
