"""Fitting a feature spec on training data: the one home of vocabulary counting, the min-count rule and the
numeric statistics.

Categorical field f maps its tokens to ids ``1..V_f-1`` by descending train frequency (ties by token);
tokens seen fewer than ``min_count`` times, and tokens never seen, map to the OOV id 0 (``spec.OOV_ID``).
``min_count`` "auto" resolves on the training rows (``resolve_min_count``). Numeric fields get the mean and
std of ``t = sign(x)·log1p(|x|)`` over their non-missing train values; a behaviour sequence gets its own
vocabulary (same rule) and ``max_len`` (default ``DEFAULT_SEQ_MAX_LEN``). ``fit`` does it in one streaming
pass over a file; ``data prepare`` (``prepared/prepare.py``) uses the same pieces (``ChunkCounts``,
``FitAccumulator``, ``CountMerger``) over its chunks, with the same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from ctr_ensemble.data.readers import open_reader
from ctr_ensemble.data.readers.base import RawBatch, list_lengths
from ctr_ensemble.data.spec import CategoricalField, FeatureSpec, NumericField, SequenceField
from ctr_ensemble.errors import CtrError

DEFAULT_SEQ_MAX_LEN = 50  # most recent items of a behaviour sequence kept per row
# Tokens seen fewer times in train map to OOV. "auto" (the default) resolves on the number of training rows:
# 2 below AUTO_LARGE_ROWS (not 1, so that the OOV embedding is trained on the train singletons and means "rare
# or unseen" at serving time), 10 from there on (Criteo-size: ~1 M kept tokens instead of ~34 M at 1, the
# BARS Criteo_x4 choice). Measured with make bench-quality (README, Members).
DEFAULT_MIN_COUNT = "auto"
AUTO_SMALL_MIN_COUNT, AUTO_LARGE_MIN_COUNT, AUTO_LARGE_ROWS = 2, 10, 10_000_000


def resolve_min_count(min_count: int | str, rows: int) -> int:
    """An explicit min_count as it is; ``"auto"`` by the number of training rows (see DEFAULT_MIN_COUNT)."""
    if min_count == "auto":
        return AUTO_LARGE_MIN_COUNT if rows >= AUTO_LARGE_ROWS else AUTO_SMALL_MIN_COUNT
    return int(min_count)


def parse_min_count(value: str) -> int | str:
    """The CLI's ``--min-count``: "auto" or an integer >= 1."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise CtrError(f"--min-count must be 'auto' or an integer >= 1, got {value!r}") from None
    check_fit_options(n, 1)
    return n


def fit(path: str | Path, min_count: int = DEFAULT_MIN_COUNT, skip_bad_rows: bool = False, fmt: str = "auto",
        seq_max_len: int = DEFAULT_SEQ_MAX_LEN, use_sequence: bool = True, max_distinct: int = 0) -> FeatureSpec:
    """Fit vocabularies and numeric statistics on one (training) file, in one streaming pass.

    A behaviour-sequence column, when the file has one, becomes the spec's ``sequence`` field
    (``seq_max_len`` most recent items) unless ``use_sequence`` is False. ``max_distinct`` caps the
    distinct tokens counted per field (see ``CountMerger``); 0 counts every token exactly."""
    check_fit_options(min_count, seq_max_len)
    reader = open_reader(path, fmt, skip_bad_rows=skip_bad_rows)
    seq_name = reader.seq_name if use_sequence else None
    acc = FitAccumulator(list(reader.cat_names), list(reader.num_names), seq_name, max_distinct)
    for batch in tqdm(reader, desc=f"fit vocab {Path(path).name}", unit="chunk"):
        acc.add(ChunkCounts.of(batch, seq_name is not None))
    fitted_on = {"file": str(path), "format": reader.format, "rows": reader.stats.rows,
                 "skipped_rows": reader.stats.skipped}
    return acc.spec(min_count, seq_max_len, fitted_on, ignored_sequence=reader.seq_name if seq_name is None else None,
                    source=str(path))


def check_fit_options(min_count: int | str, seq_max_len: int) -> None:
    if min_count == "auto":
        pass
    elif not isinstance(min_count, int) or isinstance(min_count, bool) or min_count < 1:
        raise CtrError(f"min_count must be >= 1, got {min_count}")
    if seq_max_len < 1:
        raise CtrError(f"seq_max_len must be >= 1, got {seq_max_len}")


def count_tokens(col: pa.Array) -> tuple[np.ndarray, pa.Table]:
    """One chunk's tokens → (local ids (B,) int32, counts): ``counts`` is a (value, count) table of the
    chunk's distinct tokens, and local id i is row i of it (dictionary encoding)."""
    d = pc.dictionary_encode(col)
    idx = d.indices.to_numpy(zero_copy_only=False)
    counts = np.bincount(idx, minlength=len(d.dictionary)).astype(np.int64)
    values = d.dictionary if pa.types.is_string(d.dictionary.type) else d.dictionary.cast(pa.string())
    return idx.astype(np.int32, copy=False), pa.table({"value": values, "count": pa.array(counts)})


class CountMerger:
    """Token counts of one field summed over chunks, held as an Arrow (value, count) table.

    Memory: about ``len(token) + 12`` bytes per distinct token (string data, offset, int64 count), plus
    the chunk tables not merged yet (at most as many rows as the merged table: merges happen when the
    pending rows reach it, so every count is re-merged O(log chunks) times) and a merge's hash-table
    scratch. With ``max_distinct`` > 0 a merge keeps only the ``max_distinct`` most frequent tokens:
    memory is then bounded whatever the data, and a kept token's count is low by at most the largest
    count dropped (``max_dropped``), which is 0 whenever no field exceeded the cap.
    """

    MIN_MERGE_ROWS = 1 << 20

    def __init__(self, max_distinct: int = 0):
        self.max_distinct = max_distinct
        self.merged: pa.Table | None = None
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.max_dropped = 0
        self.dropped = 0  # distinct tokens dropped by the cap (a token may be counted again after a drop)

    def add(self, counts: pa.Table) -> None:
        self.pending.append(counts)
        self.pending_rows += counts.num_rows
        merged_rows = self.merged.num_rows if self.merged is not None else 0
        if self.pending_rows >= max(merged_rows, self.MIN_MERGE_ROWS):
            self._merge()

    def _merge(self) -> None:
        parts = ([self.merged] if self.merged is not None else []) + self.pending
        self.pending, self.pending_rows = [], 0
        if not parts:
            return
        t = pa.concat_tables(parts).group_by("value", use_threads=False).aggregate([("count", "sum")])
        t = t.select(["value", "count_sum"]).rename_columns(["value", "count"])
        if self.max_distinct and t.num_rows > self.max_distinct:
            t = t.sort_by([("count", "descending"), ("value", "ascending")])
            self.max_dropped = max(self.max_dropped, int(t["count"][self.max_distinct].as_py()))
            self.dropped += t.num_rows - self.max_distinct
            t = t.slice(0, self.max_distinct)
        self.merged = t

    def result(self) -> pa.Table:
        self._merge()
        if self.merged is None:
            return pa.table({"value": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
        return self.merged

    def nbytes(self) -> int:
        return (self.merged.nbytes if self.merged is not None else 0) + sum(t.nbytes for t in self.pending)


def token_partition(values: pa.Array, parts: int) -> np.ndarray:
    """Partition (0..parts-1) of each string by a polynomial hash of its UTF-8 bytes, vectorised over the
    Arrow buffers: the same token lands in the same partition in every chunk, so partitions merge alone."""
    values = values.cast(pa.string()) if not pa.types.is_string(values.type) else values
    n = len(values)
    if n == 0 or parts <= 1:
        return np.zeros(n, np.int64)
    offsets = np.frombuffer(values.buffers()[1], np.int32, n + 1, values.offset * 4).astype(np.int64)
    data = np.frombuffer(values.buffers()[2], np.uint8) if values.buffers()[2] is not None else np.zeros(0, np.uint8)
    data = data[offsets[0]: offsets[-1]].astype(np.uint64)
    starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
    pos = np.arange(len(data)) - np.repeat(starts, lengths)
    powers = np.cumprod(np.full(max(int(lengths.max(initial=0)), 1), 1_000_003, np.uint64))  # wraps mod 2^64
    terms = data * powers[pos] if len(data) else data
    h = np.zeros(n, np.uint64)
    nonempty = lengths > 0
    if nonempty.any():
        h[nonempty] = np.add.reduceat(terms, starts[nonempty])
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    return ((h >> np.uint64(32)) % np.uint64(parts)).astype(np.int64)


def vocab_from_counts(counts: pa.Table, min_count: int) -> list[str]:
    """Tokens seen at least ``min_count`` times, by count desc then token (byte order = code-point
    order for UTF-8), so the vocabulary is deterministic."""
    keep = counts.filter(pc.greater_equal(counts["count"], min_count))
    return keep.sort_by([("count", "descending"), ("value", "ascending")])["value"].to_pylist()


@dataclass
class ChunkCounts:
    """What fitting reads from a chunk of rows: per-field token counts (and each row's local id into
    them, which ``data prepare`` keeps), numeric sums, the sequence's item counts and length histogram."""

    rows: int
    cat_ids: list[np.ndarray]  # per field: (B,) int32 local ids into cat_counts[f]
    cat_counts: list[pa.Table]
    num_sums: np.ndarray  # (3, n_num): sum of t, sum of t², count of non-missing t = sign(x)·log1p(|x|)
    seq_items: np.ndarray | None = None  # (total items,) int32 local ids into seq_counts, rows' items in order
    seq_counts: pa.Table | None = None
    seq_lengths: np.ndarray | None = None  # (B,) int64
    positives: int = 0  # rows with label 1

    @classmethod
    def of(cls, batch: RawBatch, with_sequence: bool) -> ChunkCounts:
        ids, counts = zip(*(count_tokens(col) for col in batch.cat)) if batch.cat else ((), ())
        t = signed_log1p(batch.num)
        ok = ~np.isnan(t)
        sums = np.stack([np.where(ok, t, 0).sum(0), np.where(ok, t * t, 0).sum(0), ok.sum(0)])
        out = cls(rows=len(batch.label), cat_ids=list(ids), cat_counts=list(counts), num_sums=sums,
                  positives=int(np.count_nonzero(batch.label)))
        if with_sequence:
            out.seq_items, out.seq_counts = count_tokens(batch.seq.flatten())
            out.seq_lengths = list_lengths(batch.seq)
        return out


class FitAccumulator:
    """Chunk statistics merged into a feature spec; memory grows with distinct tokens only (``CountMerger``)."""

    def __init__(self, cat_names: list[str], num_names: list[str], seq_name: str | None, max_distinct: int = 0):
        if not cat_names:
            raise CtrError("no categorical fields; every member needs at least one")
        self.cat_names, self.num_names, self.seq_name = cat_names, num_names, seq_name
        self.counts = [CountMerger(max_distinct) for _ in cat_names]
        self.seq_counts = CountMerger(max_distinct) if seq_name else None
        self.num_sums = np.zeros((3, len(num_names)))
        self.seq_hist = np.zeros(1, np.int64)  # rows per history length
        self.rows = 0
        self.positives: int | None = 0  # None once a chunk came without its label count (label mean unknown)
        self._vocab: dict[int, list[str]] = {}  # fields already finished
        self._distinct: dict[int, int] = {}  # distinct tokens counted per field (before min_count)

    def add(self, c: ChunkCounts) -> None:
        for merger, counts in zip(self.counts, c.cat_counts):
            merger.add(counts)
        self.add_sums(c.rows, c.num_sums, np.bincount(c.seq_lengths) if c.seq_lengths is not None else None, c.positives)
        if self.seq_counts is not None:
            self.seq_counts.add(c.seq_counts)

    def merger(self, f: int) -> CountMerger:
        """Field ``f``'s counts; f = n_cat is the sequence's items."""
        return self.counts[f] if f < len(self.counts) else self.seq_counts

    def finish_field(self, f: int, min_count: int, kept: pa.Table | None = None, distinct: int = 0) -> None:
        """Fix field ``f``'s vocabulary now and free its counts (fitting one field at a time bounds memory
        by the largest field's distinct tokens instead of all fields'). ``kept``/``distinct``: the counts
        (at least the tokens seen ``min_count`` times) and the number of distinct tokens, when the caller
        merged them itself (in partitions)."""
        m = self.merger(f)
        counts = m.result() if kept is None else kept
        self._vocab[f] = vocab_from_counts(counts, min_count)
        self._distinct[f] = counts.num_rows if kept is None else distinct
        m.merged, m.pending = None, []

    def _field_vocab(self, f: int, min_count: int) -> list[str]:
        if f not in self._vocab:
            counts = self.merger(f).result()
            self._vocab[f] = vocab_from_counts(counts, min_count)
            self._distinct[f] = counts.num_rows
        return self._vocab[f]

    def add_sums(self, rows: int, num_sums: np.ndarray, seq_hist: np.ndarray | None, positives: int | None) -> None:
        """Add a chunk's row count, numeric sums, history-length histogram and positive labels (None: not
        counted, e.g. a chunk read by an older version; the spec then records no ``label_mean``)."""
        self.rows += rows
        self.positives = None if positives is None or self.positives is None else self.positives + int(positives)
        self.num_sums += num_sums
        if seq_hist is not None:
            n = max(len(seq_hist), len(self.seq_hist))
            self.seq_hist = np.pad(self.seq_hist, (0, n - len(self.seq_hist))) + np.pad(seq_hist, (0, n - len(seq_hist)))

    def spec(self, min_count: int | str, seq_max_len: int, fitted_on: dict, ignored_sequence: str | None = None,
             source: str = "data") -> FeatureSpec:
        if self.rows == 0:
            raise CtrError(f"{source}: no valid rows to fit the feature encoding on")
        if min_count == "auto":
            fitted_on = {**fitted_on, "min_count_rule": "auto"}
        min_count = resolve_min_count(min_count, self.rows)
        cats = [CategoricalField(name=n, vocab=self._field_vocab(f, min_count)) for f, n in enumerate(self.cat_names)]
        sequence, seq_info = None, None
        if self.seq_name is not None:
            sequence = SequenceField(name=self.seq_name, vocab=self._field_vocab(len(self.cat_names), min_count),
                                     max_len=seq_max_len)
            seq_info = sequence_info(self.seq_name, self.seq_hist, seq_max_len)
        s1, s2, cnt = self.num_sums
        nums = []
        for j, name in enumerate(self.num_names):
            m = s1[j] / cnt[j] if cnt[j] else 0.0
            var = s2[j] / cnt[j] - m * m if cnt[j] else 1.0
            nums.append(NumericField(name=name, mean=float(m), std=float(max(np.sqrt(max(var, 0.0)), 1e-6))))
        capped = {n: {"distinct_dropped": m.dropped, "max_count_dropped": m.max_dropped}
                  for n, m in zip(self.cat_names + ([self.seq_name] if self.seq_name else []),
                                  self.counts + ([self.seq_counts] if self.seq_counts else [])) if m.dropped}
        names = self.cat_names + ([self.seq_name] if self.seq_name else [])
        fitted_on = {**fitted_on, "sequence": seq_info, "ignored_sequence": ignored_sequence,
                     "distinct_tokens": {n: self._distinct[f] for f, n in enumerate(names)}}
        if self.positives is not None:  # the training base rate, for normalised entropy (metrics.normalized_entropy)
            fitted_on["label_mean"] = self.positives / self.rows
        if capped:
            fitted_on["max_distinct_capped"] = capped
        return FeatureSpec(categorical=cats, numeric=nums, min_count=min_count, fitted_on=fitted_on, sequence=sequence)


def sequence_info(name: str, hist: np.ndarray, max_len: int) -> dict:
    """History-length summary from a histogram (rows per length): mean, 95th percentile (linear
    interpolation, as ``np.percentile``), longest, rows longer than ``max_len``."""
    n = int(hist.sum())
    lengths = np.arange(len(hist))
    cum = np.cumsum(hist)

    def at(rank: int) -> int:  # the rank-th smallest length (0-based)
        return int(np.searchsorted(cum, rank, side="right"))

    pos = 0.95 * (n - 1)
    lo, hi = int(np.floor(pos)), int(np.ceil(pos))
    p95 = at(lo) + (at(hi) - at(lo)) * (pos - lo)
    return {"name": name, "mean_len": float((lengths * hist).sum() / max(n, 1)), "p95_len": float(p95),
            "max_len_seen": int(lengths[hist > 0].max()) if n else 0,
            "rows_truncated": int(hist[max_len + 1:].sum())}


def signed_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))
