"""Feature encoding: per-field vocabularies and numeric statistics, fitted on train only.

Categorical field f maps its tokens to ids ``1..V_f-1`` by descending train frequency;
tokens seen fewer than ``min_count`` times, and tokens never seen, map to the OOV id 0.
The empty token (a missing value) is a token like any other, so a frequent "missing"
gets its own id. Numeric fields stay raw floats (NaN = missing): the model applies
``t = sign(x)·log1p(|x|)`` standardised by the train mean/std stored here, inside the
exported graph, so a served model takes the same raw numbers as the file.

A behaviour-sequence field (a list of item tokens per row, oldest first, e.g. MovieLens
``history``) gets its own vocabulary (same min-count/OOV rule) and a ``max_len``: the encoder
keeps the ``max_len`` most recent items, left-aligned and zero-padded, as ``seq_ids`` (B, L)
plus their count ``seq_len`` (B, 1). Rows with an empty history have ``seq_len`` 0.

The spec is saved as versioned JSON beside every model (``feature_spec.json``). Its ``fitted_on``
says what it was fitted on (file, rows, ...) and, since this was added, the training base rate
``label_mean`` (share of label-1 rows), the reference of normalised entropy; older specs lack it.
``fitted_on`` is not part of the fingerprint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from ctr_ensemble.data.readers.base import RawBatch
from ctr_ensemble.data.readers import open_reader
from ctr_ensemble.errors import CtrError

SPEC_FORMAT = "ctr-ensemble/feature-spec"
SPEC_VERSION = 2  # 2 added the optional ``sequence`` field; version-1 files still load
OOV_ID = 0
DEFAULT_SEQ_MAX_LEN = 50

# Every model input: name → numpy dtype. Which of them a model takes depends on the spec
# (``FeatureSpec.input_names``); the batch axis is always first.
INPUT_DTYPES = {"cat_ids": np.int64, "num": np.float32, "seq_ids": np.int64, "seq_len": np.int64}


def feed_rows(feeds: dict[str, np.ndarray]) -> int:
    """Rows in a dict of model inputs (every input has the batch axis first)."""
    return len(next(iter(feeds.values())))


def slice_feeds(feeds: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    return {k: v[start:stop] for k, v in feeds.items()}


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

@dataclass
class CategoricalField:
    name: str
    vocab: list[str]  # vocab[i] has id i + 1; id 0 is OOV

    @property
    def size(self) -> int:
        return len(self.vocab) + 1


@dataclass
class NumericField:
    name: str
    mean: float  # of sign(x)·log1p(|x|) over non-missing train values
    std: float


@dataclass
class SequenceField:
    name: str
    vocab: list[str]  # vocab[i] has id i + 1; id 0 is OOV (and the padding, masked by seq_len)
    max_len: int  # most recent items kept per row

    @property
    def size(self) -> int:
        return len(self.vocab) + 1


@dataclass
class FeatureSpec:
    categorical: list[CategoricalField]
    numeric: list[NumericField]
    min_count: int = 10
    fitted_on: dict = field(default_factory=dict)
    sequence: SequenceField | None = None

    @property
    def input_names(self) -> tuple[str, ...]:
        """Inputs of a member built on this spec. ``num`` is left out when the data has no numeric
        field (Avazu, libSVM) because Triton forbids a zero-sized dimension in a model config;
        ``seq_ids``/``seq_len`` exist only with a sequence field."""
        return ("cat_ids", *(("num",) if self.n_num else ()), *(("seq_ids", "seq_len") if self.sequence else ()))

    @property
    def input_dims(self) -> dict[str, list[int]]:
        """Per-row shape of each input (-1: dynamic sequence length)."""
        dims = {"cat_ids": [self.n_cat], "num": [self.n_num], "seq_ids": [-1], "seq_len": [1]}
        return {n: dims[n] for n in self.input_names}

    @property
    def cat_sizes(self) -> list[int]:
        return [f.size for f in self.categorical]

    @property
    def n_cat(self) -> int:
        return len(self.categorical)

    @property
    def n_num(self) -> int:
        return len(self.numeric)

    def to_dict(self) -> dict:
        # Built by hand: dataclasses.asdict deep-copies every vocabulary token (seconds for 10^6 tokens).
        return {"format": SPEC_FORMAT, "version": SPEC_VERSION,
                "categorical": [{"name": f.name, "vocab": list(f.vocab)} for f in self.categorical],
                "numeric": [asdict(n) for n in self.numeric], "min_count": self.min_count,
                "fitted_on": json.loads(json.dumps(self.fitted_on)),
                "sequence": None if self.sequence is None else
                {"name": self.sequence.name, "vocab": list(self.sequence.vocab), "max_len": self.sequence.max_len}}

    @classmethod
    def from_dict(cls, d: dict, source: str = "feature spec") -> FeatureSpec:
        if d.get("format") != SPEC_FORMAT:
            raise CtrError(f"{source}: not a ctr-ensemble feature spec (format={d.get('format')!r})")
        if d.get("version") not in (1, SPEC_VERSION):
            raise CtrError(f"{source}: feature spec version {d.get('version')} is not supported (expected 1..{SPEC_VERSION})")
        try:
            seq = d.get("sequence")
            return cls(
                categorical=[CategoricalField(**c) for c in d["categorical"]],
                numeric=[NumericField(**n) for n in d["numeric"]],
                min_count=int(d["min_count"]),
                fitted_on=d.get("fitted_on", {}),
                sequence=SequenceField(**seq) if seq else None,
            )
        except (KeyError, TypeError) as e:
            raise CtrError(f"{source}: malformed feature spec: {e}") from e

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> FeatureSpec:
        path = Path(path)
        if not path.is_file():
            raise CtrError(f"{path}: feature spec not found")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CtrError(f"{path}: feature spec is not valid JSON: {e}") from e
        return cls.from_dict(d, source=str(path))

    def fingerprint(self) -> str:
        """A short hash of what the model depends on (vocabularies and numeric stats)."""
        import hashlib

        d = self.to_dict()
        d.pop("fitted_on", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


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


def list_lengths(seq: pa.Array) -> np.ndarray:
    """Items per row (B,) int64 of a list array; a null list has none."""
    return pc.fill_null(pc.list_value_length(seq), 0).to_numpy(zero_copy_only=False).astype(np.int64)


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
