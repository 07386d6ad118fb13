"""The one offline reference of what the server computes.

Members run through ONNX Runtime on their exported ``model.onnx`` (what Triton runs) or through PyTorch from
their checkpoints (what was trained): ``member_outputs``, ``checkpoint_members``. The ensemble's fusion is then
computed exactly as the Triton fusion model (``triton/fusion_model.py``) computes it: ``Fusion`` parses the
fusion model's config as its ``initialize`` does (the ``layers.fusion`` rule with the config's parameters, or
the collaborative head from its head file, checksum verified) and fuses float32 member outputs with the same
code. ``evaluation.evaluate``, the load tests (``loadtest.rows``) and the export's parity checks
(``repository.write_repository``) all use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tritonclient.grpc import model_config_pb2 as mc

from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import onnx_export
from ctr_ensemble.layers.fusion import (COLLABORATIVE, HEAD_FILE, HEAD_FORMAT, HEAD_VERSION, CollaborativeHead, FusionRule,
                                        head_from_payload)
from ctr_ensemble.metrics import PARITY_TOL
from ctr_ensemble.models import checkpoint, ensemble
from ctr_ensemble.models.base import Member
from ctr_ensemble.models.predict import predict_outputs

Outputs = Mapping[str, tuple[np.ndarray, np.ndarray | None]]  # member name → (prob (N,), repr (N, H) or None)


def member_outputs(member: Member | ort.InferenceSession | str | Path,
                   feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(prob (N,), repr (N, H)) float32 of one member on ``feeds`` (model inputs by name): a ``Member`` through
    PyTorch in eval mode; an ONNX Runtime session, or the path of an exported ``model.onnx``, through ONNX Runtime."""
    if isinstance(member, (str, Path)):
        member = onnx_export.session(member)
    if isinstance(member, ort.InferenceSession):
        return onnx_export.run_onnx(member, feeds)
    return predict_outputs(member, feeds)


def checkpoint_members(manifest: dict, overrides: dict[str, str] | None = None) -> dict[str, Member]:
    """A repository's members in PyTorch (eval mode), in ensemble order, from the checkpoints its repository.json
    records: each member's, or for a collaborative repository the collaborative checkpoint's. ``overrides``:
    member name → checkpoint path (``collab`` → a collaborative checkpoint)."""
    overrides = overrides or {}
    names = list(manifest["members"])
    fusion = manifest["fusion"]
    if fusion["mode"] == COLLABORATIVE:
        path = overrides.get("collab", fusion.get("checkpoint"))
        if not path:
            raise CtrError("collaborative repository without a known checkpoint; pass --checkpoint collab=PATH")
        cc = ensemble.load(path)
        if cc.names != names:
            raise CtrError(f"{path}: members {cc.names} do not match the repository's {names}")
        return {m.name: m.build() for m in cc.members}
    paths = {n: overrides.get(n, manifest["members"][n].get("checkpoint")) for n in names}
    for n, path in paths.items():
        if not path:
            raise CtrError(f"member {n}: no checkpoint known; pass --checkpoint {n}=PATH")
    return {n: checkpoint.load(path).build() for n, path in paths.items()}


def load_head(path: str | Path) -> tuple[CollaborativeHead, list[str]]:
    """The head exactly as the served fusion model loads it (checksum verified) and the members it was trained for."""
    payload = checkpoint.read_verified(path, "collaborative head", HEAD_FORMAT, HEAD_VERSION)
    try:
        return head_from_payload(payload)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CtrError(f"{path}: not a usable collaborative head: {e}") from e


@dataclass(frozen=True, eq=False)
class Fusion:
    """A fusion model as the server runs it, on numpy: a rule over the members' probabilities, or the
    collaborative head over their probabilities and representations."""

    prob_inputs: tuple[str, ...]  # ``<member>_prob``, in the config's order
    repr_inputs: tuple[str, ...] = ()  # ``<member>_repr`` (collaborative)
    rule: FusionRule | None = None
    head: CollaborativeHead | None = None

    @classmethod
    def from_config(cls, cfg: mc.ModelConfig, model_dir: Path, version: str = "1") -> "Fusion":
        """Parsed as the fusion model's ``initialize`` parses ``cfg`` (the config of ``model_dir``): the rule from
        its parameters, or the head from ``head_file`` in the version folder."""
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        names = [i.name for i in cfg.input]
        probs = tuple(n for n in names if n.endswith("_prob"))
        reprs = tuple(n for n in names if n.endswith("_repr"))
        if params.get("fusion_mode") == COLLABORATIVE:
            head, members = load_head(Path(model_dir) / version / (params.get("head_file") or HEAD_FILE))
            fusion = cls(probs, reprs, head=head)
            if members != fusion.members or [n[: -len("_repr")] for n in reprs] != members:
                raise CtrError(f"{model_dir}: the head was trained for members {members}, but the model's inputs are "
                               f"{list(probs + reprs)}")
            return fusion
        try:
            rule = FusionRule.from_params(params, members=len(probs))
        except ValueError as e:
            raise CtrError(f"{Path(model_dir) / 'config.pbtxt'}: fusion parameters: {e}") from None
        return cls(probs, rule=rule)

    @classmethod
    def of_members(cls, names: list[str], rule: FusionRule | None = None,
                   head: CollaborativeHead | None = None) -> "Fusion":
        """The fusion of the ensemble's wiring (``<m>_prob``, and with a head ``<m>_repr``) with ``rule`` or ``head``."""
        return cls(tuple(f"{n}_prob" for n in names), tuple(f"{n}_repr" for n in names) if head is not None else (),
                   rule, head)

    @property
    def members(self) -> list[str]:
        return [n[: -len("_prob")] for n in self.prob_inputs]

    @property
    def needs_repr(self) -> bool:
        return self.head is not None

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Fused probability (N,) and weights (N, M) in float32 from the fusion model's inputs by name:
        ``<m>_prob`` ((N,) or (N, 1)) and, with a head, ``<m>_repr`` (N, H_m)."""
        probs = torch.from_numpy(np.stack([np.asarray(inputs[n], np.float32).reshape(-1) for n in self.prob_inputs], axis=1))
        with torch.no_grad():
            if self.head is None:
                fused, w = self.rule.fuse(probs)
            else:
                logit, w = self.head(probs, [torch.from_numpy(np.asarray(inputs[n], np.float32)) for n in self.repr_inputs])
                fused = torch.sigmoid(logit)
        return fused[:, 0].numpy(), w.numpy()

    def fuse(self, outputs: Outputs) -> tuple[np.ndarray, np.ndarray]:
        """``self(...)`` from member outputs by member name (``member_outputs``)."""
        inputs = {f"{m}_prob": outputs[m][0] for m in self.members}
        if self.needs_repr:
            inputs.update({f"{m}_repr": outputs[m][1] for m in self.members})
        return self(inputs)


def parity(reference: np.ndarray, served: np.ndarray, differs: str) -> dict:
    """Max |Δ| between fused probabilities (N,); beyond ``metrics.PARITY_TOL`` a CtrError that says
    ``f"{differs} by <Δ>"``."""
    diff = float(np.max(np.abs(served - reference))) if len(reference) else 0.0
    if not diff <= PARITY_TOL:
        raise CtrError(f"{differs} by {diff:.3g} (> {PARITY_TOL})")
    return {"rows": int(len(reference)), "prob_max_abs_diff": diff}
