"""Assemble a Triton model repository: ONNX members, the fusion Python model, the ensemble.

Layout written (Triton's standard repository layout)::

    <repo>/
      repository.json                 what was exported, from which checkpoints, parity figures
      <member>/config.pbtxt           backend "onnxruntime", dynamic batching, explicit instances
      <member>/feature_spec.json      how raw rows become cat_ids / num / seq_ids + seq_len
      <member>/1/model.onnx
      fusion/config.pbtxt             backend "python", parameters fusion_mode and tau
      fusion/1/model.py, ctr_fusion.py
      ctr_ensemble/config.pbtxt       platform "ensemble": members → fusion
      ctr_ensemble/1/

The whole repository is built in a sibling temp folder and swapped in by rename, so a
failed export never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import onnx_export, validate
from ctr_ensemble.features import INPUT_DTYPES, FeatureSpec
from ctr_ensemble.layers import fusion as fusion_math
from ctr_ensemble.training.checkpoint import Checkpoint

ENSEMBLE_NAME = "ctr_ensemble"
FUSION_NAME = "fusion"
TRITON_SRC = Path(__file__).parent / "triton"


@dataclass
class RepoOptions:
    max_batch_size: int = 4096
    instances: int = 1  # per member
    intra_op_threads: int = 1  # ONNX Runtime threads per member instance
    max_queue_delay_us: int = 200
    fusion_mode: str = "negation_entropy"
    tau: float = 1.0
    fusion_kind: str = "auto"  # auto | cpu | gpu
    fusion_instances: int = 1


def _io(name: str, dtype: int, dims: list[int]):
    return {"name": name, "data_type": dtype, "dims": dims}


def _params(**kv) -> dict:
    return {k: mc.ModelParameter(string_value=str(v)) for k, v in kv.items()}


def _write_config(cfg: mc.ModelConfig, model_dir: Path) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(cfg))


_TRITON_TYPES = {np.dtype(np.int64): mc.TYPE_INT64, np.dtype(np.float32): mc.TYPE_FP32}


def _inputs(spec: FeatureSpec) -> list:
    """The spec's inputs; ``seq_ids`` has dims [-1]: any history length per request."""
    return [mc.ModelInput(**_io(n, _TRITON_TYPES[np.dtype(INPUT_DTYPES[n])], d)) for n, d in spec.input_dims.items()]


def member_config(name: str, spec: FeatureSpec, repr_dim: int, opt: RepoOptions) -> mc.ModelConfig:
    cfg = mc.ModelConfig(
        name=name,
        backend="onnxruntime",
        max_batch_size=opt.max_batch_size,
        default_model_filename="model.onnx",
        input=_inputs(spec),
        output=[mc.ModelOutput(**_io("prob", mc.TYPE_FP32, [1])), mc.ModelOutput(**_io("repr", mc.TYPE_FP32, [repr_dim]))],
        instance_group=[mc.ModelInstanceGroup(count=opt.instances, kind=mc.ModelInstanceGroup.KIND_CPU)],
        dynamic_batching=mc.ModelDynamicBatching(max_queue_delay_microseconds=opt.max_queue_delay_us),
    )
    for k, v in _params(intra_op_thread_count=opt.intra_op_threads).items():
        cfg.parameters[k].CopyFrom(v)
    return cfg


def fusion_config(members: list[str], opt: RepoOptions, kind: str) -> mc.ModelConfig:
    cfg = mc.ModelConfig(
        name=FUSION_NAME,
        backend="python",
        max_batch_size=opt.max_batch_size,
        input=[mc.ModelInput(**_io(f"{m}_prob", mc.TYPE_FP32, [1])) for m in members],
        output=[mc.ModelOutput(**_io("prob", mc.TYPE_FP32, [1])), mc.ModelOutput(**_io("weights", mc.TYPE_FP32, [len(members)]))],
        instance_group=[mc.ModelInstanceGroup(
            count=opt.fusion_instances,
            kind=mc.ModelInstanceGroup.KIND_GPU if kind == "gpu" else mc.ModelInstanceGroup.KIND_CPU,
        )],
    )
    # GPU inputs stay on the GPU instead of being copied to host first.
    for k, v in _params(fusion_mode=opt.fusion_mode, tau=opt.tau, FORCE_CPU_ONLY_INPUT_TENSORS="no").items():
        cfg.parameters[k].CopyFrom(v)
    return cfg


def ensemble_config(members: list[str], spec: FeatureSpec, opt: RepoOptions) -> mc.ModelConfig:
    steps = [
        mc.ModelEnsembling.Step(
            model_name=m, model_version=-1,
            input_map={k: k for k in spec.input_names}, output_map={"prob": f"{m}_prob"},
        )
        for m in members
    ]
    steps.append(mc.ModelEnsembling.Step(
        model_name=FUSION_NAME, model_version=-1,
        input_map={f"{m}_prob": f"{m}_prob" for m in members},
        output_map={"prob": "prob", "weights": "weights"},
    ))
    return mc.ModelConfig(
        name=ENSEMBLE_NAME,
        platform="ensemble",
        max_batch_size=opt.max_batch_size,
        input=_inputs(spec),
        output=[mc.ModelOutput(**_io("prob", mc.TYPE_FP32, [1])), mc.ModelOutput(**_io("weights", mc.TYPE_FP32, [len(members)]))],
        ensemble_scheduling=mc.ModelEnsembling(step=steps),
    )


def resolve_fusion_kind(kind: str) -> str:
    if kind not in ("auto", "cpu", "gpu"):
        raise CtrError(f"fusion kind must be auto, cpu or gpu, got {kind!r}")
    if kind == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return kind


def write_repository(
    checkpoints: list[Checkpoint],
    repo: str | Path,
    opt: RepoOptions,
    parity_rows: dict[str, np.ndarray] | None = None,
) -> dict:
    """Export every member to ONNX, check parity on ``parity_rows`` (model inputs by name, as
    ``Arrays.feeds()``; plus OOV/NaN/sequence-length stress rows),
    and write the repository atomically. Returns the manifest (also saved as repository.json)."""
    if not checkpoints:
        raise CtrError("no members to export")
    names = [c.name for c in checkpoints]
    if len(set(names)) != len(names):
        raise CtrError(f"member names must be unique, got {names}")
    if FUSION_NAME in names or ENSEMBLE_NAME in names:
        raise CtrError(f"member names {FUSION_NAME!r} and {ENSEMBLE_NAME!r} are reserved")
    if opt.fusion_mode not in fusion_math.MODES:
        raise CtrError(f"fusion mode must be one of {fusion_math.MODES}, got {opt.fusion_mode!r}")
    spec0 = checkpoints[0].spec
    for c in checkpoints[1:]:
        if c.spec.fingerprint() != spec0.fingerprint():
            raise CtrError(f"members {checkpoints[0].name} and {c.name} were trained with different feature specs; "
                           "an ensemble needs one encoding for all members")
    kind = resolve_fusion_kind(opt.fusion_kind)
    repo = Path(repo).resolve()
    repo.parent.mkdir(parents=True, exist_ok=True)
    staging = repo.with_name(f"{repo.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    manifest = {"format": "ctr-ensemble/repository", "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "ensemble": ENSEMBLE_NAME, "fusion": {"model": FUSION_NAME, "mode": opt.fusion_mode, "tau": opt.tau, "kind": kind},
                "members": {}, "feature_spec_fingerprint": spec0.fingerprint()}
    try:
        for ck in checkpoints:
            model = ck.build()
            mdir = staging / ck.name
            onnx_path = onnx_export.export_member(model, ck.spec, mdir / "1" / "model.onnx")
            entry = {"arch": ck.arch, "checkpoint": ck.source, "repr_dim": model.repr_dim, "val_auc": ck.metrics.get("val_auc"),
                     "onnx_sha256": validate.file_sha256(onnx_path)}
            if parity_rows is not None:
                sess = onnx_export.session(onnx_path)
                entry["parity"] = onnx_export.parity(model, sess, parity_rows)
                entry["parity_stress"] = onnx_export.parity(model, sess, onnx_export.stress_rows(parity_rows, ck.spec))
                worst = max(entry["parity"]["prob_max_abs_diff"], entry["parity_stress"]["prob_max_abs_diff"])
                if not worst <= onnx_export.PARITY_TOL:
                    raise CtrError(f"{ck.name}: ONNX Runtime differs from PyTorch by {worst:.3g} (> {onnx_export.PARITY_TOL})")
            _write_config(member_config(ck.name, ck.spec, model.repr_dim, opt), mdir)
            ck.spec.save(mdir / "feature_spec.json")
            manifest["members"][ck.name] = entry
        fdir = staging / FUSION_NAME
        _write_config(fusion_config(names, opt, kind), fdir)
        (fdir / "1").mkdir(parents=True)
        shutil.copy(TRITON_SRC / "fusion_model.py", fdir / "1" / "model.py")
        shutil.copy(Path(fusion_math.__file__), fdir / "1" / "ctr_fusion.py")
        edir = staging / ENSEMBLE_NAME
        _write_config(ensemble_config(names, spec0, opt), edir)
        (edir / "1").mkdir(parents=True)
        spec0.save(edir / "feature_spec.json")
        (staging / "repository.json").write_text(json.dumps(manifest, indent=2))
        validate.check(staging)  # what Triton would refuse never replaces a working repository
        swap_in(staging, repo)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def swap_in(staging: Path, repo: Path) -> None:
    """Replace ``repo`` by ``staging`` with two renames; the old tree is removed only afterwards."""
    old = repo.with_name(f"{repo.name}.old-{os.getpid()}")
    if repo.exists():
        repo.rename(old)
    staging.rename(repo)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(repo: str | Path) -> dict:
    path = Path(repo) / "repository.json"
    if not path.is_file():
        raise CtrError(f"{repo}: not a ctr-ensemble model repository (no repository.json); run `ctr-ensemble export` first")
    return json.loads(path.read_text())


def repository_spec(repo: str | Path) -> FeatureSpec:
    return FeatureSpec.load(Path(repo) / ENSEMBLE_NAME / "feature_spec.json")
