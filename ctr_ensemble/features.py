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

The spec is saved as versioned JSON beside every model (``feature_spec.json``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from ctr_ensemble.data.criteo import RawBatch
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
        return {"format": SPEC_FORMAT, "version": SPEC_VERSION, **asdict(self)}

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


def fit(path: str | Path, min_count: int = 10, skip_bad_rows: bool = False, fmt: str = "auto",
        seq_max_len: int = DEFAULT_SEQ_MAX_LEN, use_sequence: bool = True) -> FeatureSpec:
    """Fit vocabularies and numeric statistics on one (training) file, in one streaming pass.

    A behaviour-sequence column, when the file has one, becomes the spec's ``sequence`` field
    (``seq_max_len`` most recent items) unless ``use_sequence`` is False."""
    if min_count < 1:
        raise CtrError(f"min_count must be >= 1, got {min_count}")
    if seq_max_len < 1:
        raise CtrError(f"seq_max_len must be >= 1, got {seq_max_len}")
    reader = open_reader(path, fmt, skip_bad_rows=skip_bad_rows)
    cat_names, num_names = list(reader.cat_names), list(reader.num_names)
    if not cat_names:
        raise CtrError(f"{path}: no categorical fields; every member needs at least one")
    counts = [Counter() for _ in cat_names]
    s1 = np.zeros(len(num_names))
    s2 = np.zeros(len(num_names))
    cnt = np.zeros(len(num_names))
    seq_name = reader.seq_name if use_sequence else None
    seq_counts: Counter = Counter()
    seq_lengths: list[np.ndarray] = []
    for batch in tqdm(reader, desc=f"fit vocab {Path(path).name}", unit="chunk"):
        if seq_name is not None:
            vc = pc.value_counts(batch.seq.flatten())
            seq_counts.update(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())))
            seq_lengths.append(pc.list_value_length(batch.seq).to_numpy(zero_copy_only=False))
        for f, col in enumerate(batch.cat):
            vc = pc.value_counts(col)
            counts[f].update(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist())))
        t = signed_log1p(batch.num)
        ok = ~np.isnan(t)
        s1 += np.where(ok, t, 0).sum(0)
        s2 += np.where(ok, t * t, 0).sum(0)
        cnt += ok.sum(0)
    if reader.stats.rows == 0:
        raise CtrError(f"{path}: no valid rows to fit the feature encoding on")
    cats = [CategoricalField(name=name, vocab=_vocab(c, min_count)) for name, c in zip(cat_names, counts)]
    sequence, seq_info = None, None
    if seq_name is not None:
        sequence = SequenceField(name=seq_name, vocab=_vocab(seq_counts, min_count), max_len=seq_max_len)
        lengths = np.concatenate(seq_lengths)
        seq_info = {"name": seq_name, "mean_len": float(lengths.mean()), "p95_len": float(np.percentile(lengths, 95)),
                    "max_len_seen": int(lengths.max()), "rows_truncated": int((lengths > seq_max_len).sum())}
    nums = []
    for j, name in enumerate(num_names):
        m = s1[j] / cnt[j] if cnt[j] else 0.0
        var = s2[j] / cnt[j] - m * m if cnt[j] else 1.0
        nums.append(NumericField(name=name, mean=float(m), std=float(max(np.sqrt(max(var, 0.0)), 1e-6))))
    return FeatureSpec(
        categorical=cats,
        numeric=nums,
        min_count=min_count,
        fitted_on={"file": str(path), "format": reader.format, "rows": reader.stats.rows,
                   "skipped_rows": reader.stats.skipped, "sequence": seq_info,
                   "ignored_sequence": reader.seq_name if seq_name is None else None},
        sequence=sequence,
    )


def _vocab(counts: Counter, min_count: int) -> list[str]:
    """Tokens seen at least ``min_count`` times, by count desc then token, so the vocabulary is deterministic."""
    return sorted((t for t, k in counts.items() if k >= min_count), key=lambda t: (-counts[t], t))


def signed_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


class Encoder:
    """Turns raw batches into model inputs: ``cat_ids`` (B, n_cat) int64, ``num`` (B, n_num) float32,
    and with a sequence field ``seq_ids`` (B, max_len) int64 + ``seq_len`` (B, 1) int64."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self._vocab = [pa.array(f.vocab, type=pa.string()) for f in spec.categorical]
        self._seq_vocab = pa.array(spec.sequence.vocab, type=pa.string()) if spec.sequence else None

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
        max_len = self.spec.sequence.max_len
        off = seq.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        values = seq.flatten()  # honours a sliced array's offset
        off = off - off[0]
        lengths = np.diff(off)
        idx = pc.index_in(values, value_set=self._seq_vocab)
        flat = pc.fill_null(pc.add(idx, 1), OOV_ID).to_numpy(zero_copy_only=False).astype(np.int64)
        keep = np.minimum(lengths, max_len)
        start = off[:-1] + lengths - keep  # drop the oldest items beyond max_len
        pos = np.arange(max_len)
        valid = pos[None, :] < keep[:, None]
        src = np.where(valid, start[:, None] + pos[None, :], 0)
        ids = np.where(valid, flat[src] if len(flat) else 0, 0).astype(np.int64)
        return ids, keep.astype(np.int64)[:, None]

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
