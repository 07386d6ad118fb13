"""Validate a Triton model repository before a server is started on it.

Triton with ``--strict-readiness --exit-on-error`` already refuses a broken repository, but
only after minutes of start-up and with the reason buried in its log. ``validate`` finds
the same problems in about a second and names the model, the file and what was expected:

* every ``<model>/config.pbtxt`` parses as a Triton ``ModelConfig`` whose ``name`` is its folder;
* ONNX members: ``1/model.onnx`` exists, matches the checksum recorded at export, passes
  ``onnx.checker``, and its inputs/outputs have the names, dtypes and per-row dims of the config;
* Python models: ``1/model.py`` (and the fusion's ``ctr_fusion.py``) exist and compile; the fusion rule's
  parameters (e.g. ``tau``; fitted: ``priors``, ``space``) parse as the served fusion model parses them
  (``layers.fusion.FusionRule``, which imports torch), with one prior per member; a collaborative fusion's
  head file matches its checksum;
* the ensemble: every step names a model of the repository, maps only inputs/outputs that the
  step model has, and every ensemble input and output is wired;
* ``repository.json`` and each ``feature_spec.json`` load, and the inputs of a config beside a feature spec have
  its dims: every one fixed, ``seq_ids`` exactly ``max_len`` wide (the bound of a request; dims [-1] would let
  a client send any history width).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ctr_ensemble import files
from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.errors import CtrError
from ctr_ensemble.export.served import onnx_checksums, served_models

_ONNX_TYPES = {onnx.TensorProto.INT64: mc.TYPE_INT64, onnx.TensorProto.FLOAT: mc.TYPE_FP32,
               onnx.TensorProto.INT32: mc.TYPE_INT32, onnx.TensorProto.DOUBLE: mc.TYPE_FP64}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_config(path: Path) -> mc.ModelConfig:
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as e:
        raise ValueError(f"not a valid Triton model config: {e}") from e


def _onnx_io(model: onnx.ModelProto) -> dict[str, tuple[int, list[int]]]:
    """name → (Triton dtype, per-row dims with -1 for symbolic axes) for graph inputs and outputs."""
    out = {}
    for v in [*model.graph.input, *model.graph.output]:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        out[v.name] = (_ONNX_TYPES.get(t.elem_type, -t.elem_type), dims[1:])
    return out


def _check_onnx_member(mdir: Path, cfg: mc.ModelConfig, expected_sha: str | None, problems: list[str]) -> None:
    path = mdir / "1" / (cfg.default_model_filename or "model.onnx")
    if not path.is_file():
        problems.append(f"{path}: missing (member {cfg.name!r} has no ONNX file)")
        return
    if expected_sha and file_sha256(path) != expected_sha:
        problems.append(f"{path}: checksum differs from the one recorded at export (file changed or corrupt)")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # onnx raises DecodeError, ValidationError, ...
        problems.append(f"{path}: not a valid ONNX model: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
        return
    io = _onnx_io(model)
    for kind, tensors in (("input", cfg.input), ("output", cfg.output)):
        for t in tensors:
            if t.name not in io:
                problems.append(f"{mdir / 'config.pbtxt'}: {kind} {t.name!r} is not in {path.name} (it has {sorted(io)})")
                continue
            dtype, dims = io[t.name]
            if dtype != t.data_type:
                problems.append(f"{mdir / 'config.pbtxt'}: {kind} {t.name!r} is {mc.DataType.Name(t.data_type)} but "
                                f"{path.name} has {mc.DataType.Name(dtype) if dtype > 0 else f'ONNX type {-dtype}'}")
            elif len(dims) != len(t.dims) or any(a != b and -1 not in (a, b) for a, b in zip(dims, t.dims)):
                problems.append(f"{mdir / 'config.pbtxt'}: {kind} {t.name!r} has dims {list(t.dims)} but "
                                f"{path.name} has {dims} per row")


def _check_python_model(mdir: Path, cfg: mc.ModelConfig, problems: list[str]) -> None:
    needed = ["model.py"] + (["ctr_fusion.py"] if (mdir / "1" / "ctr_fusion.py").exists() or cfg.name == "fusion" else [])
    for name in needed:
        path = mdir / "1" / name
        if not path.is_file():
            problems.append(f"{path}: missing (Python model {cfg.name!r})")
            continue
        try:
            compile(path.read_bytes(), str(path), "exec")
        except (SyntaxError, ValueError) as e:
            problems.append(f"{path}: does not compile: {type(e).__name__}: {e}")
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    if "fusion_mode" not in params:
        return
    # The served model's own parser and constants (imports torch: ~1-2 s, only for a fusion model).
    from ctr_ensemble.layers.fusion import COLLABORATIVE, HEAD_FILE, FusionRule

    if params["fusion_mode"] != COLLABORATIVE:
        try:
            # The fusion model takes one <member>_prob per member; a single-hop variant lists its members.
            members = json.loads(params["members"]) if "members" in params else [i for i in cfg.input if i.name.endswith("_prob")]
            if not isinstance(members, list):
                raise ValueError(f"parameter members must be a JSON list, got {params['members']!r}")
            FusionRule.from_params(params, members=len(members))
            for m in members if "members" in params else ():
                if not (mdir / "1" / f"{m}.onnx").is_file():
                    problems.append(f"{mdir / '1' / f'{m}.onnx'}: missing (member {m!r} of single-hop model {cfg.name!r})")
        except ValueError as e:
            problems.append(f"{mdir / 'config.pbtxt'}: fusion parameters: {e}")
    else:  # the trained head, checked as the fusion model will check it
        head = mdir / "1" / (params.get("head_file") or HEAD_FILE)
        sha = head.with_name(head.name + ".sha256")
        if not head.is_file() or not sha.is_file():
            problems.append(f"{head}: missing (collaborative head of {cfg.name!r}, with its .sha256)")
        elif file_sha256(head) not in files.listed_digests(sha):
            problems.append(f"{head}: checksum does not match {sha.name}")


def _check_ensemble(cfg: mc.ModelConfig, configs: dict[str, mc.ModelConfig], where: Path, problems: list[str]) -> None:
    produced = {i.name for i in cfg.input}
    consumed: set[str] = set()
    for step in cfg.ensemble_scheduling.step:
        target = configs.get(step.model_name)
        if target is None:
            problems.append(f"{where}: step model {step.model_name!r} is not in the repository")
            continue
        t_in, t_out = {i.name for i in target.input}, {o.name for o in target.output}
        for inner, outer in step.input_map.items():
            if inner not in t_in:
                problems.append(f"{where}: step {step.model_name!r} maps input {inner!r}, which the model does not have")
            consumed.add(outer)
        for inner, outer in step.output_map.items():
            if inner not in t_out:
                problems.append(f"{where}: step {step.model_name!r} maps output {inner!r}, which the model does not have")
            produced.add(outer)
        missing = t_in - set(step.input_map)
        if missing:
            problems.append(f"{where}: step {step.model_name!r} leaves inputs {sorted(missing)} unmapped")
    for name in consumed - produced:
        problems.append(f"{where}: tensor {name!r} is consumed by a step but never produced")
    for o in cfg.output:
        if o.name not in produced:
            problems.append(f"{where}: ensemble output {o.name!r} is produced by no step")


def validate(repo: str | Path) -> list[str]:
    """All problems found in ``repo`` (empty list: the repository is consistent)."""
    repo = Path(repo)
    if not repo.is_dir():
        return [f"{repo}: no such model repository"]
    problems: list[str] = []
    manifest: dict = {}
    if (repo / "repository.json").is_file():
        try:
            manifest = json.loads((repo / "repository.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problems.append(f"{repo / 'repository.json'}: not valid JSON: {e}")
    configs: dict[str, mc.ModelConfig] = {}
    for cfg_path in sorted(repo.glob("*/config.pbtxt")):
        try:
            cfg = _load_config(cfg_path)
        except ValueError as e:
            problems.append(f"{cfg_path}: {e}")
            continue
        if cfg.name and cfg.name != cfg_path.parent.name:
            problems.append(f"{cfg_path}: name {cfg.name!r} differs from its folder {cfg_path.parent.name!r}")
        configs[cfg_path.parent.name] = cfg
    if not configs and not problems:
        return [f"{repo}: no */config.pbtxt: not a model repository (run `ctr-ensemble export`)"]
    served = served_models(manifest) if manifest else {}
    for member in manifest.get("members", {}):
        name = served.get(member, member)
        if name not in configs and not (repo / name / "config.pbtxt").exists():
            problems.append(f"{repo / name / 'config.pbtxt'}: missing (member {member!r} is listed in repository.json)")
    shas = onnx_checksums(manifest) if manifest else {}
    for name, cfg in configs.items():
        mdir = repo / name
        if cfg.platform == "ensemble":
            _check_ensemble(cfg, configs, mdir / "config.pbtxt", problems)
        elif cfg.backend == "python":
            _check_python_model(mdir, cfg, problems)
        elif cfg.backend == "onnxruntime" or cfg.platform == "onnxruntime_onnx":
            sha = shas.get(name)
            _check_onnx_member(mdir, cfg, sha, problems)
        if (mdir / "feature_spec.json").exists():
            try:
                spec = FeatureSpec.load(mdir / "feature_spec.json")
            except CtrError as e:
                problems.append(str(e))
                continue
            _check_bounds(cfg, spec, mdir / "config.pbtxt", problems)
    return problems


def _check_bounds(cfg: mc.ModelConfig, spec: FeatureSpec, where: Path, problems: list[str]) -> None:
    """Each input the spec defines has the spec's per-row dims (``FeatureSpec.input_dims``)."""
    dims = spec.input_dims
    for i in cfg.input:
        if i.name in dims and list(i.dims) != dims[i.name]:
            unbounded = " (unbounded: re-export, or `ctr-ensemble export --from-repository` to bound it)" if -1 in i.dims else ""
            problems.append(f"{where}: input {i.name!r} has dims {list(i.dims)}, the feature spec's are "
                            f"{dims[i.name]}{unbounded}")


def check(repo: str | Path) -> None:
    """Raise CtrError listing every problem of ``repo``."""
    problems = validate(repo)
    if problems:
        raise CtrError(f"{repo}: {len(problems)} problem(s) in the model repository:\n  " + "\n  ".join(problems))
