"""Held-out rows for load tests, shaped as the served model wants them, and their offline predictions.

Input names, datatypes and dims come from the model (Triton model metadata, or its config.pbtxt
when no server is up), never hard-coded: each input name is looked up as a field of the encoded
``Arrays`` (``cat_ids``, ``num``, and any field a later encoder adds under the model's input name).

The offline reference is what the server must return for those rows, computed outside it
(``export.reference``): ONNX Runtime on the member's ``model.onnx``; for an ensemble of ONNX members and the
fusion Python model, the members through ONNX Runtime, wired as the ensemble's steps say, and the fusion as
the served config says (a rule with its parameters, or the collaborative head over probs and reprs). A model
of another kind raises ``NoReference`` and its variant is skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import triton_to_np_dtype

from ctr_ensemble.data.encode import encode_file
from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import reference
from ctr_ensemble.export.repository import ENSEMBLE_NAME, read_config
from ctr_ensemble.export.served import VARIANT_MODELS

LABEL = "label"


class NoReference(CtrError):
    """The repository has no offline reference for this model (the variant is skipped, not failed)."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str  # Triton datatype string: INT64, FP32, ...
    dims: tuple[int, ...]  # without the batch dimension

    def as_dict(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "dims": list(self.dims)}


def inputs_from_metadata(meta: dict) -> list[InputSpec]:
    """From ``client.get_model_metadata(model)`` (HTTP JSON): dims without the batch dimension."""
    return [InputSpec(i["name"], i["datatype"], tuple(int(d) for d in i["shape"][1:])) for i in meta["inputs"]]


def inputs_from_config(repo: Path, model: str) -> list[InputSpec]:
    cfg = read_config(Path(repo) / model)
    return [InputSpec(i.name, mc.DataType.Name(i.data_type).removeprefix("TYPE_").replace("STRING", "BYTES"), tuple(i.dims))
            for i in cfg.input]


def model_spec(repo: Path, model: str) -> FeatureSpec:
    for path in (Path(repo) / model / "feature_spec.json", Path(repo) / ENSEMBLE_NAME / "feature_spec.json"):
        if path.is_file():
            return FeatureSpec.load(path)
    raise CtrError(f"{repo}: no feature_spec.json for model {model!r} (looked in {model}/ and {ENSEMBLE_NAME}/)")


def load_rows(data: Path, repo: Path, model: str, inputs: list[InputSpec], max_rows: int, fmt: str = "auto") -> dict[str, np.ndarray]:
    """{input name: (N, *dims) array, "label": (N,)} for the first ``max_rows`` rows of ``data``."""
    if not Path(data).is_file():
        raise CtrError(f"{data}: held-out data file not found (pass --data)")
    arr = encode_file(data, model_spec(repo, model), fmt=fmt)
    n = min(len(arr), max_rows)
    rows = {}
    for spec in inputs:
        col = getattr(arr, spec.name, None)
        if not isinstance(col, np.ndarray):
            raise CtrError(f"model {model!r} input {spec.name!r}: the encoded data of {data} has no such field "
                           f"(fields: cat_ids, num, ...)")
        col = np.ascontiguousarray(col[:n], dtype=triton_to_np_dtype(spec.datatype))
        if tuple(col.shape[1:]) != tuple(d for d in spec.dims) and -1 not in spec.dims:
            raise CtrError(f"model {model!r} input {spec.name!r}: expects dims {list(spec.dims)} per row, "
                           f"the encoded data has {list(col.shape[1:])}")
        rows[spec.name] = col
    rows[LABEL] = np.asarray(arr.label[:n], np.float32)
    if len(np.unique(rows[LABEL])) < 2:
        raise CtrError(f"{data}: the first {n} rows have one class only; AUC needs both (raise --max-rows)")
    return rows


# ---------------------------------------------------------------------------------------------
# Offline reference


class _OnnxCache:
    """Member outputs by ONNX file identity (variant repositories hard-link the same files)."""

    def __init__(self) -> None:
        self._outputs: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def member(self, onnx_path: Path, rows: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(prob (N,), repr (N, H)) float32 of the member in ``onnx_path`` on ``rows`` (``reference.member_outputs``)."""
        st = os.stat(onnx_path)
        key = (st.st_dev, st.st_ino, st.st_size, id(rows))
        if key not in self._outputs:
            try:
                self._outputs[key] = reference.member_outputs(onnx_path, rows)
            except CtrError as e:  # a graph input the rows do not have
                raise CtrError(f"{onnx_path}: {e}") from None
        return self._outputs[key]


def _onnx_path(repo: Path, model: str, cfg: mc.ModelConfig) -> Path | None:
    path = repo / model / "1" / (cfg.default_model_filename or "model.onnx")
    return path if cfg.backend == "onnxruntime" and path.is_file() else None


def _onnx_member(repo: Path, model: str, cfg: mc.ModelConfig, rows, cache: _OnnxCache) -> np.ndarray | None:
    path = _onnx_path(repo, model, cfg)
    return None if path is None else cache.member(path, rows)[0].astype(np.float64)


def _fusion_ensemble(repo: Path, model: str, cfg: mc.ModelConfig, rows, cache: _OnnxCache) -> np.ndarray | None:
    """An ensemble of ONNX members and one fusion model: the members' outputs wired as its steps say, then the
    fusion as served (``reference.Fusion``: a rule, or the collaborative head over probs and reprs)."""
    if cfg.platform != "ensemble":
        return None
    steps = list(cfg.ensemble_scheduling.step)
    fusion = [s for s in steps if "fusion_mode" in read_config(repo / s.model_name).parameters]
    if len(fusion) != 1:
        return None
    fstep = fusion[0]
    produced = {}  # ensemble tensor -> member output (prob (N,) or repr (N, H))
    for s in steps:
        if s is fstep:
            continue
        path = _onnx_path(repo, s.model_name, read_config(repo / s.model_name))
        if path is None or "prob" not in s.output_map:
            return None
        out = dict(zip(("prob", "repr"), cache.member(path, rows)))
        produced.update({tensor: out[o] for o, tensor in s.output_map.items() if o in out})
    fcfg = read_config(repo / fstep.model_name)
    try:
        inputs = {i.name: produced[fstep.input_map[i.name]] for i in fcfg.input}
    except KeyError:
        return None
    # float32 like the server: the fusion model computes on the members' float32 outputs.
    return reference.Fusion.from_config(fcfg, repo / fstep.model_name)(inputs)[0].astype(np.float64)


def _variant(repo: Path, model: str, cfg: mc.ModelConfig, rows, cache: _OnnxCache) -> np.ndarray | None:
    """A deployment variant (``export.variants``) serves what the ensemble beside it serves: the members' ONNX
    outputs through the fusion rule. Its reference is the ensemble's, never its own graph."""
    if model not in VARIANT_MODELS.values() or not (repo / ENSEMBLE_NAME / "config.pbtxt").is_file():
        return None
    return _fusion_ensemble(repo, ENSEMBLE_NAME, read_config(repo / ENSEMBLE_NAME), rows, cache)


# A reference returns None when the model is not of its kind; the first that answers wins.
REFERENCES: list[Callable] = [_variant, _onnx_member, _fusion_ensemble]


class OfflineReference:
    def __init__(self) -> None:
        self.cache = _OnnxCache()

    def predict(self, repo: Path, model: str, rows: dict[str, np.ndarray]) -> np.ndarray:
        """(N,) float64 predictions of ``model`` from ``repo`` for ``rows``; NoReference if unknown."""
        repo = Path(repo)
        if not (repo / model / "config.pbtxt").is_file():
            raise NoReference(f"repository {repo} has no model {model!r}")
        cfg = read_config(repo / model)
        for ref in REFERENCES:
            out = ref(repo, model, cfg, rows, self.cache)
            if out is not None:
                return out
        raise NoReference(f"no offline reference for model {model!r} (backend {cfg.backend or cfg.platform!r}); "
                          "register one in ctr_ensemble.loadtest.rows.REFERENCES")
