"""Checkpoints: weights + model config + feature spec, so export can rebuild a member alone.

Written durably (temp file, fsync, rename, fsync of the folder) with a SHA-256 sidecar that verifies the old
or the new file at every crash point (``files.write_atomic``); loading verifies
the checksum and the format before any weight is used. ``write_verified``/``read_verified`` do the same for
the other torch files (collaborative checkpoints, the served head, training states).
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ctr_ensemble import files, models
from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.errors import CtrError
from ctr_ensemble.models.base import Member, MemberConfig

CKPT_FORMAT = "ctr-ensemble/checkpoint"
CKPT_VERSION = 1


@dataclass
class Checkpoint:
    name: str  # the member's name in an ensemble (unique), e.g. "deepfm"
    arch: str  # registry key
    config: MemberConfig
    spec: FeatureSpec
    state_dict: dict[str, torch.Tensor]
    metrics: dict = field(default_factory=dict)
    source: str | None = None  # the file it was loaded from, if any

    def build(self) -> Member:
        """The member with these weights, in eval mode."""
        model = models.build(self.arch, self.config, self.spec)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as e:
            raise CtrError(f"checkpoint {self.name}: weights do not fit a {self.arch} model: {str(e).splitlines()[0]}") from e
        return model.eval()


def payload(ckpt: Checkpoint) -> dict:
    """The serialisable form of a member checkpoint (also embedded in collaborative checkpoints)."""
    return {
        "format": CKPT_FORMAT,
        "version": CKPT_VERSION,
        "name": ckpt.name,
        "arch": ckpt.arch,
        "model_config": dataclasses.asdict(ckpt.config),
        "feature_spec": ckpt.spec.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "metrics": ckpt.metrics,
    }


def save(ckpt: Checkpoint, path: str | Path) -> Path:
    return write_verified(path, payload(ckpt))


def write_verified(path: str | Path, obj: dict, what: str = "checkpoint") -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically, with a SHA-256 sidecar ``<path>.sha256`` (``files.write_atomic``)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    files.write_atomic(path, buf.getvalue(), checksum=True, what=what)
    return Path(path)


def read_verified(path: str | Path, what: str = "checkpoint", fmt: str = CKPT_FORMAT, version: int = CKPT_VERSION) -> dict:
    """Load a file written by ``write_verified``: checksum, then format and version, before anything is used."""
    path = Path(path)
    data = files.read_checked(path, what)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged zip/pickle
        raise CtrError(f"{path}: not a readable {what} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise CtrError(f"{path}: not a ctr-ensemble {what} (expected format {fmt!r})")
    if obj.get("version") != version:
        raise CtrError(f"{path}: {what} version {obj.get('version')} is not supported (expected {version})")
    return obj


def load(path: str | Path) -> Checkpoint:
    path = Path(path)
    return from_payload(read_verified(path), str(path.resolve()))


def from_payload(obj: dict, source: str) -> Checkpoint:
    """A checkpoint from ``payload`` output; ``source`` names the file in errors and in ``Checkpoint.source``."""
    try:
        arch = obj["arch"]
        cfg = models.make_config(arch, obj["model_config"])
        spec = FeatureSpec.from_dict(obj["feature_spec"], source=f"{source} (feature spec)")
        return Checkpoint(
            name=obj["name"], arch=arch, config=cfg, spec=spec,
            state_dict=obj["state_dict"], metrics=obj.get("metrics", {}),
            source=source,
        )
    except KeyError as e:
        raise CtrError(f"{source}: checkpoint lacks {e}") from e
