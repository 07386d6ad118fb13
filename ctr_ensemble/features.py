"""Feature encoding: per-field vocabularies and numeric statistics, fitted on train only.

Categorical field f maps its tokens to ids ``1..V_f-1`` by descending train frequency;
tokens seen fewer than ``min_count`` times, and tokens never seen, map to the OOV id 0.
The empty token (a missing value) is a token like any other, so a frequent "missing"
gets its own id. Numeric fields stay raw floats (NaN = missing): the model applies
``t = sign(x)·log1p(|x|)`` standardised by the train mean/std stored here, inside the
exported graph, so a served model takes the same raw numbers as the file.

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
SPEC_VERSION = 1
OOV_ID = 0


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
class FeatureSpec:
    categorical: list[CategoricalField]
    numeric: list[NumericField]
    min_count: int = 10
    fitted_on: dict = field(default_factory=dict)

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
        if d.get("version") != SPEC_VERSION:
            raise CtrError(f"{source}: feature spec version {d.get('version')} is not supported (expected {SPEC_VERSION})")
        try:
            return cls(
                categorical=[CategoricalField(**c) for c in d["categorical"]],
                numeric=[NumericField(**n) for n in d["numeric"]],
                min_count=int(d["min_count"]),
                fitted_on=d.get("fitted_on", {}),
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


def fit(path: str | Path, min_count: int = 10, skip_bad_rows: bool = False, fmt: str = "auto") -> FeatureSpec:
    """Fit vocabularies and numeric statistics on one (training) file, in one streaming pass."""
    if min_count < 1:
        raise CtrError(f"min_count must be >= 1, got {min_count}")
    reader = open_reader(path, fmt, skip_bad_rows=skip_bad_rows)
    cat_names, num_names = list(reader.cat_names), list(reader.num_names)
    if not cat_names:
        raise CtrError(f"{path}: no categorical fields; every member needs at least one")
    counts = [Counter() for _ in cat_names]
    s1 = np.zeros(len(num_names))
    s2 = np.zeros(len(num_names))
    cnt = np.zeros(len(num_names))
    for batch in tqdm(reader, desc=f"fit vocab {Path(path).name}", unit="chunk"):
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
    cats = []
    for name, c in zip(cat_names, counts):
        # Sort by count desc, then token, so the vocabulary is deterministic.
        kept = sorted((t for t, k in c.items() if k >= min_count), key=lambda t: (-c[t], t))
        cats.append(CategoricalField(name=name, vocab=kept))
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
                   "skipped_rows": reader.stats.skipped, "ignored_sequence": reader.seq_name},
    )


def signed_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


class Encoder:
    """Turns raw batches into model inputs: ``cat_ids`` (B, n_cat) int64, ``num`` (B, n_num) float32."""

    def __init__(self, spec: FeatureSpec):
        self.spec = spec
        self._vocab = [pa.array(f.vocab, type=pa.string()) for f in spec.categorical]

    def check_fields(self, reader, source: str) -> None:
        """The file's fields must be the spec's, in the same order."""
        got = (list(reader.cat_names), list(reader.num_names))
        want = ([f.name for f in self.spec.categorical], [f.name for f in self.spec.numeric])
        if got != want:
            raise CtrError(f"{source}: fields do not match the feature spec: file has categorical {got[0]} and "
                           f"numeric {got[1]}, the spec expects categorical {want[0]} and numeric {want[1]}")

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
