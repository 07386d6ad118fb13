"""Checkpoints: weights + model config + feature spec, so export can rebuild a member alone.

Written atomically (temp file + rename) with a SHA-256 sidecar; loading verifies the
checksum and the format before any weight is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ctr_ensemble import models
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
    return write_atomic(payload(ckpt), path)


def write_atomic(obj: dict, path: str | Path) -> Path:
    """``torch.save`` ``obj`` to ``path`` by temp file + rename, with a SHA-256 sidecar ``<path>.sha256``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    sha_tmp = tmp.with_name(tmp.name + ".sha256")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        sha_tmp.write_text(hashlib.sha256(data).hexdigest() + "\n")
    except OSError as e:  # disk full, quota, I/O error: nothing was replaced yet
        tmp.unlink(missing_ok=True)
        sha_tmp.unlink(missing_ok=True)
        raise CtrError(f"{path}: cannot write the checkpoint ({e.strerror or e}); "
                       f"{'the previous checkpoint there is intact' if path.exists() else 'nothing was written'}") from e
    # Sidecar first: a crash between the renames leaves a checksum that fails loudly, never a silent mismatch.
    sha_tmp.replace(_sha_path(path))
    tmp.replace(path)
    return path


def remove(path: str | Path) -> None:
    """Delete a file written by ``write_atomic`` and its sidecar (missing is fine)."""
    path = Path(path)
    for p in (_sha_path(path), path):
        p.unlink(missing_ok=True)


def _sha_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def read_verified(path: str | Path, what: str = "checkpoint", fmt: str = CKPT_FORMAT, version: int = CKPT_VERSION) -> dict:
    """Load a file written by ``write_atomic``: checksum, then format and version, before anything is used."""
    path = Path(path)
    if not path.is_file():
        raise CtrError(f"{path}: {what} not found")
    data = path.read_bytes()
    sha = _sha_path(path)
    if sha.is_file():
        want = sha.read_text().strip()
        got = hashlib.sha256(data).hexdigest()
        if want != got:
            raise CtrError(f"{path}: {what} is corrupt (sha256 {got[:12]}… does not match {sha.name}: {want[:12]}…)")
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
