"""The feature spec: the one home of ``FeatureSpec`` and its fields, and of the model inputs it defines.

Categorical field f maps its tokens to ids ``1..V_f-1`` (``vocab[i]`` has id ``i + 1``); tokens outside
the vocabulary (rare in train, or never seen) map to the OOV id 0. The empty token (a missing value) is a
token like any other. Numeric fields stay raw floats (NaN = missing): the model applies
``t = sign(x)·log1p(|x|)`` standardised by the train mean/std stored here, inside the exported graph, so a
served model takes the same raw numbers as the file. A behaviour-sequence field (a list of item tokens per
row, oldest first, e.g. MovieLens ``history``) has its own vocabulary and a ``max_len``: the model sees the
``max_len`` most recent items as ``seq_ids`` (B, L) plus their count ``seq_len`` (B, 1).

Model inputs (``INPUT_DTYPES``, ``FeatureSpec.input_names``/``input_dims``) are passed as *feeds*, a dict
name → array with the batch axis first: ``cat_ids`` (B, n_cat) int64, ``num`` (B, n_num) float32, and
with a sequence ``seq_ids`` (B, max_len) int64 + ``seq_len`` (B, 1) int64. The ONNX graphs take any
history width L; the served configs fix it at ``max_len`` (``input_dims``), the bound of a request.

The spec is saved as versioned JSON beside every model (``feature_spec.json``). Its ``fitted_on``
says what it was fitted on (file, rows, ...) and, since this was added, the training base rate
``label_mean`` (share of label-1 rows), the reference of normalised entropy; older specs lack it.
``fitted_on`` is not part of the fingerprint. Fitting a spec: ``data/fit.py``; applying it: ``data/encode.py``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ctr_ensemble.errors import CtrError
from ctr_ensemble.files import write_atomic

SPEC_FORMAT = "ctr-ensemble/feature-spec"
SPEC_VERSION = 2  # 2 added the optional ``sequence`` field; version-1 files still load
OOV_ID = 0

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
        """Per-row shape of each input as served: every dim fixed, ``seq_ids`` exactly ``max_len`` wide (the encoder
        pads every row to it), so Triton refuses a wider request before any model runs."""
        seq = [self.sequence.max_len] if self.sequence else []
        dims = {"cat_ids": [self.n_cat], "num": [self.n_num], "seq_ids": seq, "seq_len": [1]}
        return {n: dims[n] for n in self.input_names}

    @property
    def row_elements(self) -> int:
        """Tensor elements in one served row (all inputs)."""
        return sum(d[0] for d in self.input_dims.values())

    @property
    def row_bytes(self) -> int:
        """Bytes of one served row in Triton's binary tensor encoding (HTTP binary data, gRPC raw contents)."""
        return sum(d[0] * np.dtype(INPUT_DTYPES[n]).itemsize for n, d in self.input_dims.items())

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
        write_atomic(path, json.dumps(self.to_dict()).encode(), what="feature spec")

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
