"""Assemble a Triton model repository: ONNX members, the fusion Python model, the ensemble.

Layout written (Triton's standard repository layout)::

    <repo>/
      repository.json                 what was exported, from which checkpoints, parity figures, request limits
      <member>/config.pbtxt           backend "onnxruntime", dynamic batching, explicit instances
      <member>/feature_spec.json      how raw rows become cat_ids / num / seq_ids + seq_len
      <member>/1/model.onnx
      fusion/config.pbtxt             backend "python", parameters fusion_mode and its rule's (``FusionRule.params``,
                                      e.g. tau; fitted: + priors, space; collaborative: head_file instead)
      fusion/1/model.py, ctr_fusion.py
      fusion/1/head.pt (+ .sha256)    collaborative mode only: the trained head's config and weights
      ctr_ensemble/config.pbtxt       platform "ensemble": members → fusion (prob, plus repr when collaborative)
      ctr_ensemble/1/

``<repo>`` itself is a symlink to a version folder beside it (``files.publish_dir``)::

    <repo> -> <repo>.versions/<n>     flipped atomically (a new symlink renamed over it) by every export
    <repo>.versions/<n>/              the repository shown now, laid out as above
    <repo>.versions/<n-1>/            the one shown before: a rollback target, and the files of a server
                                      still running on it; older versions are pruned

The whole repository is built in a sibling temp folder, validated, flushed to disk and only then published
(``publish``), so a failed or interrupted export never leaves a half-written model behind, nor a moment
without a repository; a failure while publishing puts the previous state back. A plain folder at ``<repo>``
(written before versions existed) becomes the first kept version.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ctr_ensemble.data.spec import INPUT_DTYPES, FeatureSpec
from ctr_ensemble.errors import CtrError
from ctr_ensemble import files
from ctr_ensemble.files import check_name
from ctr_ensemble.export import onnx_export, reference, validate
from ctr_ensemble.export import variants as variant_models
from ctr_ensemble.export.served import FUSION_NAME, served_models
from ctr_ensemble.layers import fusion as fusion_math
from ctr_ensemble.layers.fusion import COLLABORATIVE, FITTED, FUSION_MODES, HEAD_FILE, PARAMS, RULES, FusionRule
from ctr_ensemble.metrics import PARITY_TOL
from ctr_ensemble.models import checkpoint as ckpt_io
from ctr_ensemble.models.checkpoint import Checkpoint
from ctr_ensemble.models.ensemble import CollabCheckpoint

ENSEMBLE_NAME = "ctr_ensemble"
TRITON_SRC = Path(__file__).parent / "triton"


@dataclass
class RepoOptions:
    """Deployment settings of a repository; everything here is config.pbtxt, never the ONNX files.

    ``production=True`` emits the configs for the NGC container (docker-compose.yml): members on
    KIND_GPU, where the native onnxruntime backend runs them with the CUDA execution provider,
    and the fusion model on KIND_GPU. Such a repository cannot load on a machine without a GPU.
    """

    # Rows per request (and per dynamic batch). 1024 = the largest batch any client of the project sends
    # (evaluate, `serve score`, `make bench-serve`); benchmarks/gpu_check.py asks for 4096 itself.
    max_batch_size: int = 1024
    instances: int = 1  # per member
    intra_op_threads: int = 1  # ONNX Runtime threads per member instance
    dynamic_batching: bool = True  # per member; the ensemble has no batcher of its own
    # 0: a lone request never waits for company, and requests that queue behind a busy instance are still batched.
    # Measured (docs/serving-speed.md): 200 µs cost every batch-1 request ~0.2 ms per hop, Model Analyzer ranked
    # delay 0 first at batch 1, and 1000 µs last everywhere.
    max_queue_delay_us: int = 0
    preferred_batch_sizes: list[int] = field(default_factory=list)  # per member's dynamic batcher; [] = none
    fusion_mode: str = "negation_entropy"  # a layers.fusion.RULES rule, or collaborative (needs a collaborative checkpoint)
    # The rules' parameters (layers.fusion.PARAMS), each read only by the rules that take it:
    tau: float = 1.0  # mean / negation_entropy / fitted; the collaborative head carries its own τ
    priors: list[float] | None = None  # fitted only: a_i per member in ensemble order (export --fit-fusion)
    space: str = "prob"  # fitted only: prob | logit averaging
    fusion_kind: str = "auto"  # auto | cpu | gpu
    fusion_instances: int = 1
    production: bool = False
    # Deployment variants written beside the ensemble (export.variants): single_hop, all_onnx.
    variants: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.fusion_mode not in FUSION_MODES:
            raise CtrError(f"fusion mode must be one of {FUSION_MODES}, got {self.fusion_mode!r}")
        for name in ("max_batch_size", "instances", "fusion_instances"):
            if getattr(self, name) < 1:
                raise CtrError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queue_delay_us < 0 or self.intra_op_threads < 0:
            raise CtrError("max_queue_delay_us and intra_op_threads must be >= 0")
        if any(not 1 <= b <= self.max_batch_size for b in self.preferred_batch_sizes):
            raise CtrError(f"preferred_batch_sizes must lie in 1..max_batch_size ({self.max_batch_size}), "
                           f"got {self.preferred_batch_sizes}")
        if not self.tau >= 0:
            raise CtrError(f"tau must be >= 0, got {self.tau}")
        if self.fusion_mode != COLLABORATIVE:
            fusion_rule(self)
        resolve_fusion_kind(self.fusion_kind)
        self.variants = variant_models.check(self.variants)
        if self.variants and self.fusion_mode == COLLABORATIVE:
            raise CtrError("deployment variants serve a fusion rule over member probabilities; a collaborative "
                           "ensemble is served as the ensemble only")

    def with_rule(self, rule: FusionRule) -> "RepoOptions":
        """These options deploying ``rule`` (its mode and parameters)."""
        return replace(self, fusion_mode=rule.mode, **{p: v for p, v in rule.entry().items() if p != "mode"})


def _missing_fit(opt: RepoOptions) -> bool:
    """``opt`` names a trained rule but not its parameters (``--fusion-mode fitted`` without a fit)."""
    kind = RULES.get(opt.fusion_mode)
    return kind is not None and kind.trained and any(getattr(opt, p) is None for p in kind.params)


def fusion_rule(opt: RepoOptions, members: int | None = None) -> FusionRule:
    """The fusion rule ``opt`` deploys (not collaborative): only the parameters its rule takes count."""
    if _missing_fit(opt):
        raise CtrError(f"fusion mode {opt.fusion_mode!r} needs fitted parameters: export with --fit-fusion VAL_FILE")
    kind = RULES.get(opt.fusion_mode)
    try:
        rule = FusionRule(opt.fusion_mode, **{p: getattr(opt, p) for p in (kind.params if kind else ())})
    except ValueError as e:
        raise CtrError(f"fusion rule: {e}") from None
    for p, v in rule.values().items():
        if PARAMS[p].per_member and members is not None and len(v) != members:
            raise CtrError(f"fusion rule: {len(v)} {p} for {members} members")
    return rule


def manifest_rule(manifest: dict) -> FusionRule:
    """The (not collaborative) rule a repository's fusion model serves, from repository.json."""
    return FusionRule.from_entry(manifest["fusion"])


# Native onnxruntime backend on KIND_GPU: the CUDA execution provider, one stream for copies and compute.
CUDA_ACCELERATOR = {"name": "cuda", "parameters": {"use_ep_level_unified_stream": "1"}}


def _io(name: str, dtype: int, dims: list[int]):
    return {"name": name, "data_type": dtype, "dims": dims}


def _params(**kv) -> dict:
    return {k: mc.ModelParameter(string_value=str(v)) for k, v in kv.items()}


def _write_config(cfg: mc.ModelConfig, model_dir: Path) -> None:
    """A plain write: it lands in a staging folder, flushed to disk as a whole when published (``publish``)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(cfg))


_TRITON_TYPES = {np.dtype(np.int64): mc.TYPE_INT64, np.dtype(np.float32): mc.TYPE_FP32}


def _inputs(spec: FeatureSpec) -> list:
    """The spec's inputs, every dim fixed: ``seq_ids`` is exactly ``max_len`` wide (``FeatureSpec.input_dims``)."""
    return [mc.ModelInput(**_io(n, _TRITON_TYPES[np.dtype(INPUT_DTYPES[n])], d)) for n, d in spec.input_dims.items()]


def bound_inputs(cfg: mc.ModelConfig, spec: FeatureSpec) -> mc.ModelConfig:
    """Input dims of ``cfg`` set to the spec's (a repository exported with ``seq_ids`` dims [-1] gets [max_len])."""
    dims = spec.input_dims
    for i in cfg.input:
        if i.name in dims:
            del i.dims[:]
            i.dims.extend(dims[i.name])
    return cfg


# The largest request the configs admit, in bytes, is what a gateway (and Triton's --http-max-input-size, where
# the image has it) should let through: max_batch_size rows, each its tensor elements in the bulkiest encoding
# a client may use. Binary (tritonclient's default, gRPC raw contents) is the dtype size; JSON text is at most
# 24 bytes an element (int64 "-9223372036854775808" is 20 characters; an fp32 written as a double, e.g.
# "-1.1754943508222875e-38", 23; plus a separator). Headroom 2x plus 64 KiB for the JSON/protobuf header.
JSON_BYTES_PER_ELEMENT = 24
REQUEST_HEADROOM = 2
REQUEST_OVERHEAD_BYTES = 64 * 1024


def request_limits(spec: FeatureSpec, max_batch_size: int) -> dict:
    """The bounds of one request to a repository on ``spec`` with ``max_batch_size`` (kept in repository.json)."""
    binary = max_batch_size * spec.row_bytes
    text = max_batch_size * spec.row_elements * JSON_BYTES_PER_ELEMENT
    limit = REQUEST_HEADROOM * max(binary, text) + REQUEST_OVERHEAD_BYTES
    return {"max_batch_size": max_batch_size, "seq_max_len": spec.sequence.max_len if spec.sequence else None,
            "row_elements": spec.row_elements, "row_bytes": spec.row_bytes,
            "max_binary_request_bytes": binary, "max_json_request_bytes": text,
            "max_request_bytes": -(-limit // 1024) * 1024}  # whole KiB


def apply_member_deployment(cfg: mc.ModelConfig, opt: RepoOptions) -> mc.ModelConfig:
    """Instances, batching, threads and device of a member config (its inputs/outputs stay as they are)."""
    kind = mc.ModelInstanceGroup.KIND_GPU if opt.production else mc.ModelInstanceGroup.KIND_CPU
    cfg.max_batch_size = opt.max_batch_size
    del cfg.instance_group[:]
    cfg.instance_group.append(mc.ModelInstanceGroup(count=opt.instances, kind=kind))
    cfg.ClearField("dynamic_batching")
    if opt.dynamic_batching:
        cfg.dynamic_batching.CopyFrom(mc.ModelDynamicBatching(max_queue_delay_microseconds=opt.max_queue_delay_us,
                                                              preferred_batch_size=opt.preferred_batch_sizes))
    cfg.ClearField("optimization")
    if opt.production:
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name=CUDA_ACCELERATOR["name"])
        for k, v in CUDA_ACCELERATOR["parameters"].items():
            acc.parameters[k] = v
    for k, v in _params(intra_op_thread_count=opt.intra_op_threads).items():
        cfg.parameters[k].CopyFrom(v)
    return cfg


def apply_fusion_deployment(cfg: mc.ModelConfig, opt: RepoOptions, kind: str) -> mc.ModelConfig:
    """Instances, device, batching and fusion parameters of the fusion model config."""
    cfg.max_batch_size = opt.max_batch_size
    cfg.ClearField("dynamic_batching")
    if opt.dynamic_batching:
        # No delay: under concurrent load the requests already queued behind a busy instance are fused together
        # (one torch call, fusion_model.py), and a lone request never waits for company.
        cfg.dynamic_batching.CopyFrom(mc.ModelDynamicBatching(max_queue_delay_microseconds=0))
    del cfg.instance_group[:]
    cfg.instance_group.append(mc.ModelInstanceGroup(
        count=opt.fusion_instances,
        kind=mc.ModelInstanceGroup.KIND_GPU if kind == "gpu" else mc.ModelInstanceGroup.KIND_CPU,
    ))
    if opt.fusion_mode == COLLABORATIVE:  # the trained head carries its own τ
        params = {"fusion_mode": opt.fusion_mode, "head_file": HEAD_FILE}
    else:
        params = fusion_rule(opt).params()
    for stale in {"head_file", *PARAMS} - set(params):
        if stale in cfg.parameters:
            del cfg.parameters[stale]
    # GPU inputs stay on the GPU instead of being copied to host first.
    for k, v in _params(**params, FORCE_CPU_ONLY_INPUT_TENSORS="no").items():
        cfg.parameters[k].CopyFrom(v)
    return cfg


def member_config(name: str, spec: FeatureSpec, repr_dim: int, opt: RepoOptions) -> mc.ModelConfig:
    cfg = mc.ModelConfig(
        name=name,
        backend="onnxruntime",
        default_model_filename="model.onnx",
        input=_inputs(spec),
        output=[mc.ModelOutput(**_io("prob", mc.TYPE_FP32, [1])), mc.ModelOutput(**_io("repr", mc.TYPE_FP32, [repr_dim]))],
    )
    return apply_member_deployment(cfg, opt)


def fusion_config(members: list[str], opt: RepoOptions, kind: str, repr_dims: dict[str, int] | None = None) -> mc.ModelConfig:
    """The fusion model's config; ``repr_dims`` (collaborative mode) adds a ``<member>_repr`` input per member."""
    inputs = [mc.ModelInput(**_io(f"{m}_prob", mc.TYPE_FP32, [1])) for m in members]
    if repr_dims is not None:
        inputs += [mc.ModelInput(**_io(f"{m}_repr", mc.TYPE_FP32, [repr_dims[m]])) for m in members]
    cfg = mc.ModelConfig(
        name=FUSION_NAME,
        backend="python",
        input=inputs,
        output=[mc.ModelOutput(**_io("prob", mc.TYPE_FP32, [1])), mc.ModelOutput(**_io("weights", mc.TYPE_FP32, [len(members)]))],
    )
    return apply_fusion_deployment(cfg, opt, kind)


def ensemble_config(members: list[str], spec: FeatureSpec, opt: RepoOptions, with_repr: bool = False) -> mc.ModelConfig:
    """Members → fusion. ``with_repr`` (collaborative mode) also routes each member's ``repr`` to the fusion."""
    outs = ("prob", "repr") if with_repr else ("prob",)
    steps = [
        mc.ModelEnsembling.Step(
            model_name=m, model_version=-1,
            input_map={k: k for k in spec.input_names}, output_map={o: f"{m}_{o}" for o in outs},
        )
        for m in members
    ]
    steps.append(mc.ModelEnsembling.Step(
        model_name=FUSION_NAME, model_version=-1,
        input_map={f"{m}_{o}": f"{m}_{o}" for o in outs for m in members},
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


def resolve_fusion_kind(kind: str, production: bool = False) -> str:
    if kind not in ("auto", "cpu", "gpu"):
        raise CtrError(f"fusion kind must be auto, cpu or gpu, got {kind!r}")
    if production:
        return "gpu"
    if kind == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return kind


def write_repository(
    checkpoints: list[Checkpoint],
    repo: str | Path,
    opt: RepoOptions,
    parity_rows: dict[str, np.ndarray] | None = None,
    collab: CollabCheckpoint | None = None,
    fusion_fit: dict | None = None,
) -> dict:
    """Export every member to ONNX, check parity on ``parity_rows`` (model inputs by name, as
    ``Arrays.feeds()``; plus OOV/NaN/sequence-length stress rows),
    and write the repository atomically. Returns the manifest (also saved as repository.json).

    With ``collab`` (and ``opt.fusion_mode == COLLABORATIVE``) the members are the collaborative
    checkpoint's, the fusion model gets the trained head in ``fusion/1/head.pt`` and every member's
    ``repr`` is routed to it; parity then also covers the fused prediction against PyTorch, as it does for
    the other fusion rules (the rule over ONNX members against the rule over PyTorch members).
    ``fusion_fit``: how a fitted rule was fitted (``fusion_fit.fit_for_export``), kept in repository.json."""
    if collab is not None:
        if opt.fusion_mode != COLLABORATIVE:
            raise CtrError(f"a collaborative checkpoint is served with fusion mode {COLLABORATIVE!r}, not {opt.fusion_mode!r}")
        checkpoints = checkpoints or collab.members
        if [c.name for c in checkpoints] != collab.names:
            raise CtrError(f"members {[c.name for c in checkpoints]} are not the collaborative checkpoint's {collab.names}")
    elif opt.fusion_mode == COLLABORATIVE:
        raise CtrError("fusion mode collaborative needs a collaborative checkpoint (`ctr-ensemble export --collab PATH`)")
    if not checkpoints:
        raise CtrError("no members to export")
    names = [check_name(c.name, f"member name in {c.source or 'a checkpoint'}") for c in checkpoints]
    if len(set(names)) != len(names):
        raise CtrError(f"member names must be unique, got {names}")
    if FUSION_NAME in names or ENSEMBLE_NAME in names:
        raise CtrError(f"member names {FUSION_NAME!r} and {ENSEMBLE_NAME!r} are reserved")
    opt.validate()
    spec0 = checkpoints[0].spec
    for c in checkpoints[1:]:
        if c.spec.fingerprint() != spec0.fingerprint():
            raise CtrError(f"members {checkpoints[0].name} and {c.name} were trained with different feature specs; "
                           "an ensemble needs one encoding for all members")
    kind = resolve_fusion_kind(opt.fusion_kind, opt.production)
    rule = fusion_rule(opt, len(names)) if collab is None else None
    repo = files.published_path(repo)  # the symlink itself, not the version it shows now
    repo.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(repo)
    shutil.rmtree(staging, ignore_errors=True)
    fusion_entry = {"model": FUSION_NAME, "mode": opt.fusion_mode, "tau": opt.tau, "kind": kind}
    if rule is not None:
        fusion_entry.update(rule.entry(), **({"fit": fusion_fit} if fusion_fit is not None else {}))
    if collab is not None:
        fusion_entry.update(tau=collab.head_config["tau"], checkpoint=collab.source, head=HEAD_FILE,
                            variant=collab.head_config["variant"], learn_tau=collab.head_config["learn_tau"])
    manifest = {"format": "ctr-ensemble/repository", "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "ensemble": ENSEMBLE_NAME, "fusion": fusion_entry,
                "options": asdict(opt), "limits": request_limits(spec0, opt.max_batch_size),
                "members": {}, "feature_spec_fingerprint": spec0.fingerprint()}
    onnx_out: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # member → (prob, repr) on the parity rows: ONNX Runtime
    torch_out: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # ... and PyTorch
    repr_dims: dict[str, int] = {}
    try:
        for ck in checkpoints:
            model = ck.build()
            repr_dims[ck.name] = model.repr_dim
            mdir = staging / ck.name
            onnx_path = onnx_export.export_member(model, ck.spec, mdir / "1" / "model.onnx")
            entry = {"arch": ck.arch, "checkpoint": ck.source, "repr_dim": model.repr_dim, "val_auc": ck.metrics.get("val_auc"),
                     "onnx_sha256": validate.file_sha256(onnx_path)}
            if parity_rows is not None:
                sess = onnx_export.session(onnx_path)
                entry["parity"] = onnx_export.parity(model, sess, parity_rows)
                entry["parity_stress"] = onnx_export.parity(model, sess, onnx_export.stress_rows(parity_rows, ck.spec))
                worst = max(entry["parity"]["prob_max_abs_diff"], entry["parity_stress"]["prob_max_abs_diff"])
                if not worst <= PARITY_TOL:
                    raise CtrError(f"{ck.name}: ONNX Runtime differs from PyTorch by {worst:.3g} (> {PARITY_TOL})")
                onnx_out[ck.name] = onnx_export.run_onnx(sess, parity_rows)
                torch_out[ck.name] = reference.member_outputs(model, parity_rows)
            _write_config(member_config(ck.name, ck.spec, model.repr_dim, opt), mdir)
            ck.spec.save(mdir / "feature_spec.json")
            manifest["members"][ck.name] = entry
        fdir = staging / FUSION_NAME
        fcfg = fusion_config(names, opt, kind, repr_dims if collab is not None else None)
        _write_config(fcfg, fdir)
        (fdir / "1").mkdir(parents=True)
        shutil.copy(TRITON_SRC / "fusion_model.py", fdir / "1" / "model.py")
        shutil.copy(Path(fusion_math.__file__), fdir / "1" / "ctr_fusion.py")
        if collab is not None:
            ckpt_io.write_verified(fdir / "1" / HEAD_FILE, collab.head_payload())
        if parity_rows is not None:  # the fusion as written (config, head file) over the ONNX members, against ...
            fusion = reference.Fusion.from_config(fcfg, fdir)
            served = fusion.fuse(onnx_out)[0]
            if collab is None:  # ... the same rule over the PyTorch members
                ref = fusion.fuse(torch_out)[0]
                differs = f"fusion {rule.describe()}: over the ONNX members it differs from PyTorch"
            else:  # ... the trained collaborative model: the checkpoint's head over the PyTorch members
                ref = reference.Fusion.of_members(names, head=collab.build().head).fuse(torch_out)[0]
                differs = "collaborative fusion: ONNX members + head differ from PyTorch"
            fusion_entry["parity"] = reference.parity(ref, served, differs)
        edir = staging / ENSEMBLE_NAME
        ens_cfg = ensemble_config(names, spec0, opt, with_repr=collab is not None)
        _write_config(ens_cfg, edir)
        (edir / "1").mkdir(parents=True)
        spec0.save(edir / "feature_spec.json")
        if opt.variants:
            manifest["variants"] = variant_models.write(staging, opt.variants, {n: staging / n / "1" / "model.onnx" for n in names},
                                                  spec0, rule, ens_cfg, read_config(staging / names[0]), parity_rows)
        (staging / "repository.json").write_text(json.dumps(manifest, indent=2))
        validate.check(staging)  # what Triton would refuse never replaces a working repository
        publish(staging, repo)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def fitted_rule(manifest: dict) -> FusionRule | None:
    """The fitted rule of repository.json: the one served (a trained rule), else the one fitted at export (kept
    when a reconfigure switched to another rule); None if it has neither."""
    kind = RULES.get(manifest["fusion"]["mode"])
    if kind is not None and kind.trained:
        return manifest_rule(manifest)
    rule = (manifest["fusion"].get("fit") or {}).get("rule")
    return FusionRule.from_entry({"mode": FITTED, **rule}) if rule else None  # older records name no mode: fitted


def publish(staging: Path, repo: str | Path) -> Path:
    """Make the complete, validated folder ``staging`` the repository ``repo`` shows: flushed to disk, moved in
    as a new version and switched to by an atomic symlink flip, every step undone if one fails
    (``files.publish_dir``). Returns the new version folder. ``staging`` must sit beside ``repo``
    (``staging_path``): a rename across file systems is no rename."""
    return files.publish_dir(staging, repo, what="model repository")


swap_in = publish  # the name callers used before versions


def staging_path(repo: str | Path) -> Path:
    """Where a new version of ``repo`` is built: a folder beside it, named for this process."""
    repo = files.published_path(repo)
    return repo.with_name(f"{repo.name}.staging-{os.getpid()}")


def link_or_copy(a: str, b: str) -> str:
    """``shutil.copytree``'s copy function: model files inside version folders are hard-linked (never rewritten in
    place), everything else copied, since writing a config through a hard link would change the source too."""
    if Path(a).parent.name.isdigit() and not a.endswith(".py"):
        return files.hardlink_or_copy(a, b)
    return shutil.copy2(a, b)


def read_config(model_dir: Path) -> mc.ModelConfig:
    path = Path(model_dir) / "config.pbtxt"
    try:
        return text_format.Parse(path.read_text(), mc.ModelConfig())
    except (OSError, text_format.ParseError) as e:
        raise CtrError(f"{path}: cannot read the model config: {e}") from e


def reconfigure_repository(src: str | Path, dst: str | Path, opt: RepoOptions) -> dict:
    """Copy repository ``src`` to ``dst`` with the deployment settings of ``opt`` (instances, batching,
    fusion rule, device, production); model files are hard-linked where possible, never re-exported.
    Outputs stay as exported; input dims are set to the feature spec's (bounding the ``seq_ids`` width of a
    repository exported before it was fixed at ``max_len``). Returns the new manifest."""
    src, dst = files.published_path(src), files.published_path(dst)
    manifest = read_manifest(src)
    for name in manifest["members"]:  # they become paths below: a tampered repository.json must not escape
        check_name(name, f"{src / 'repository.json'}: member name")
    if _missing_fit(opt):  # the fitted parameters the source was exported with
        fitted = fitted_rule(manifest)
        if fitted is None or opt.fusion_mode not in (FITTED, fitted.mode):  # fitted: whichever rule the fit chose
            raise CtrError(f"{src}: has no fitted fusion to deploy; export it with --fit-fusion VAL_FILE")
        opt = opt.with_rule(fitted)
    opt.validate()
    was_collab = manifest["fusion"]["mode"] == COLLABORATIVE
    if was_collab != (opt.fusion_mode == COLLABORATIVE):
        raise CtrError(f"{src}: fusion mode {manifest['fusion']['mode']!r} cannot become {opt.fusion_mode!r} without a re-export: "
                       + ("pass --fusion-mode collaborative to keep its trained head" if was_collab else
                          "a collaborative fusion needs a trained head (`ctr-ensemble export --collab PATH`)"))
    kind = resolve_fusion_kind(opt.fusion_kind, opt.production)
    rule = None if was_collab else fusion_rule(opt, len(manifest["members"]))
    staging = staging_path(dst)
    shutil.rmtree(staging, ignore_errors=True)

    try:
        shutil.copytree(src, staging, copy_function=link_or_copy)
        served = served_models(manifest)  # a deployed repository: the current release's models
        spec = repository_spec(staging)
        for name in manifest["members"]:
            mdir = staging / check_name(served[name], f"{src / 'repository.json'}: served model name")
            _write_config(bound_inputs(apply_member_deployment(read_config(mdir), opt), spec), mdir)
        fdir = staging / check_name(served[FUSION_NAME], f"{src / 'repository.json'}: served model name")
        _write_config(apply_fusion_deployment(read_config(fdir), opt, kind), fdir)
        ens = bound_inputs(read_config(staging / ENSEMBLE_NAME), spec)
        ens.max_batch_size = opt.max_batch_size
        _write_config(ens, staging / ENSEMBLE_NAME)
        member_files = {m: staging / served[m] / "1" / "model.onnx" for m in manifest["members"]}
        manifest["variants"] = variant_models.write(staging, opt.variants, member_files, spec, rule, ens,
                                              read_config(staging / served[next(iter(member_files))]))
        if not manifest["variants"]:
            del manifest["variants"]
        if rule is not None:  # a parity figure of another rule does not hold for this one
            stale = [p for p in PARAMS if p not in rule.kind.params] + (["parity"] if manifest_rule(manifest) != rule else [])
            for k in stale:
                manifest["fusion"].pop(k, None)
            manifest["fusion"].update(rule.entry())
        manifest["fusion"].update(mode=opt.fusion_mode, kind=kind)
        manifest["options"] = asdict(opt)
        manifest["limits"] = request_limits(spec, opt.max_batch_size)
        manifest["derived_from"] = str(src)
        (staging / "repository.json").write_text(json.dumps(manifest, indent=2))
        validate.check(staging)
        publish(staging, dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def read_manifest(repo: str | Path) -> dict:
    path = Path(repo) / "repository.json"
    if not path.is_file():
        raise CtrError(f"{repo}: not a ctr-ensemble model repository (no repository.json); run `ctr-ensemble export` first")
    return json.loads(path.read_text())


def repository_spec(repo: str | Path) -> FeatureSpec:
    return FeatureSpec.load(Path(repo) / ENSEMBLE_NAME / "feature_spec.json")
