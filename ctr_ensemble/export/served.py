"""Which Triton model serves each member of a repository's current release (see ``export.release``)."""

from __future__ import annotations

import json
from pathlib import Path

FUSION_NAME = "fusion"
# Deployment variants (export.variants) → the model each is served as, beside the ensemble.
VARIANT_MODELS = {"single_hop": "ctr_single_hop", "all_onnx": "ctr_all_onnx"}


def served_models(manifest: dict) -> dict[str, str]:
    """member (and ``fusion``) → the model that serves it now: itself, unless a deploy made another release current."""
    names = {n: n for n in [*manifest.get("members", {}), FUSION_NAME]}
    rel = manifest.get("releases")
    if rel:
        names.update(next(e["models"] for e in rel["history"] if e["id"] == rel["current"]))
    return names


def onnx_checksums(manifest: dict) -> dict[str, str]:
    """model folder → the ONNX checksum recorded when its release was exported (every release kept)."""
    rel = manifest.get("releases")
    entries = [(e["models"], e["manifest"]) for e in rel["history"]] if rel else [(served_models(manifest), manifest)]
    return {models[m]: info["onnx_sha256"] for models, man in entries
            for m, info in man.get("members", {}).items() if info.get("onnx_sha256") and m in models}


def variant_models(repo: str | Path) -> list[str]:
    """The variant models of ``repo`` (repository.json ``variants``) that a server loads beside the ensemble."""
    path = Path(repo) / "repository.json"
    try:
        entries = json.loads(path.read_text()).get("variants", {}) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return []  # the validator reports a broken repository.json
    return [VARIANT_MODELS[v] for v in entries if v in VARIANT_MODELS and (Path(repo) / VARIANT_MODELS[v] / "config.pbtxt").is_file()]
