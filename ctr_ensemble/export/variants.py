"""Deployment variants of an ensemble: the same members and fusion rule, served along fewer hops.

Beside the default ``ctr_ensemble`` (a Triton ensemble: members, then the ``fusion`` Python model), an export
with ``variants`` also writes:

- ``single_hop`` → model ``ctr_single_hop``: one Python model that runs the members' ONNX sessions and the
  reference fusion code in one process (``triton/single_hop_model.py``). One Python-backend hop instead of
  two; CPU only (the production container's Python has no onnxruntime).
- ``all_onnx`` → model ``ctr_all_onnx``: the members and the fusion rule as one ONNX graph
  (``export.onnx_fusion``), served by the ``onnxruntime`` backend: native in the NGC container, where no
  Python runs in the hot path and the whole graph runs on ONNX Runtime's CUDA (or TensorRT) provider.

Each takes the ensemble's inputs and returns its outputs (``prob`` (B, 1), ``weights`` (B, N)) and the members'
deployment settings, with N times their intra-op threads (it does the work of N member instances); the server loads
them beside the ensemble (``TritonServer.flags``). Their model files are the members' ONNX files (hard links)
or a graph built from them, so a variant always serves the members of its export. ``all_onnx`` is parity-checked
against the reference fusion over the members' ONNX outputs (``metrics.PARITY_TOL``) whenever rows are given.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ctr_ensemble import files
from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import onnx_export, onnx_fusion, reference
from ctr_ensemble.layers.fusion import FusionRule

from ctr_ensemble.export.served import VARIANT_MODELS as MODELS  # variant → its Triton model

SINGLE_HOP, ALL_ONNX = MODELS
TRITON_SRC = Path(__file__).parent / "triton"


def check(names) -> list[str]:
    """``names`` as a list of known variants, each once (CtrError naming the unknown one)."""
    names = list(names or [])
    bad = [n for n in names if n not in MODELS]
    if bad:
        raise CtrError(f"unknown deployment variant(s) {bad}; choose from {', '.join(MODELS)}")
    if len(set(names)) != len(names):
        raise CtrError(f"deployment variants must be unique, got {names}")
    return names


def write(repo: Path, names: list[str], members: dict[str, Path], spec: FeatureSpec, rule: FusionRule,
          ensemble: mc.ModelConfig, member_cfg: mc.ModelConfig, rows: dict[str, np.ndarray] | None = None) -> dict:
    """Write the variant models ``names`` into the (staging) repository ``repo``, after removing any it had.

    ``members``: member → its ONNX file, in ensemble order; ``ensemble``: the ensemble's config (its inputs and
    outputs are the variants'); ``member_cfg``: a member's config after the deployment options (instances,
    batching, threads, device), which the variants take. Returns repository.json's ``variants`` entry."""
    for model in MODELS.values():
        shutil.rmtree(repo / model, ignore_errors=True)
    entries = {}
    for name in check(names):
        mdir = repo / MODELS[name]
        (mdir / "1").mkdir(parents=True)
        cfg = mc.ModelConfig(name=MODELS[name], max_batch_size=ensemble.max_batch_size)
        cfg.input.extend(ensemble.input)
        cfg.output.extend(ensemble.output)
        cfg.instance_group.extend(member_cfg.instance_group)
        if member_cfg.HasField("dynamic_batching"):
            cfg.dynamic_batching.CopyFrom(member_cfg.dynamic_batching)
        # One model runs all N members: it gets the cores the ensemble's N member instances use (0 = ORT's default).
        threads = int(member_cfg.parameters["intra_op_thread_count"].string_value or 0) * len(members)
        cfg.parameters["intra_op_thread_count"].string_value = str(threads)
        entry = {"model": MODELS[name]}
        if name == SINGLE_HOP:
            cfg.backend = "python"
            for g in cfg.instance_group:  # see the module docstring: CPU only
                g.kind = mc.ModelInstanceGroup.KIND_CPU
            for k, v in {**rule.params(), "members": json.dumps(list(members))}.items():
                cfg.parameters[k].string_value = v
            shutil.copy(TRITON_SRC / "single_hop_model.py", mdir / "1" / "model.py")
            shutil.copy(Path(reference.__file__).parents[1] / "layers" / "fusion.py", mdir / "1" / "ctr_fusion.py")
            for m, path in members.items():
                files.hardlink_or_copy(path, mdir / "1" / f"{m}.onnx")
        else:
            cfg.backend, cfg.default_model_filename = "onnxruntime", "model.onnx"
            cfg.optimization.CopyFrom(member_cfg.optimization)
            onnx_fusion.write_fused_model(members, rule, mdir / "1" / "model.onnx")
            if rows is not None:
                entry["parity"] = parity(mdir / "1" / "model.onnx", members, rule, rows)
        (mdir / "config.pbtxt").write_text(text_format.MessageToString(cfg))
        entries[name] = entry
    return entries


def parity(fused_path: Path, members: dict[str, Path], rule: FusionRule, rows: dict[str, np.ndarray]) -> dict:
    """The fused graph's ``prob`` against the reference fusion over the members' own ONNX outputs on ``rows``."""
    outs = {m: reference.member_outputs(p, rows) for m, p in members.items()}
    ref = reference.Fusion.of_members(list(members), rule).fuse(outs)[0]
    sess = onnx_export.session(fused_path)
    served = sess.run(["prob"], {i.name: rows[i.name] for i in sess.get_inputs()})[0][:, 0]
    return reference.parity(ref, served, f"all-ONNX variant ({rule.describe()}) differs from the reference fusion")


