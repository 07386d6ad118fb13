"""Releases inside a served model repository: what ``ctr-ensemble deploy`` and ``rollback`` write.

A running Triton (``--model-control-mode=explicit``) can only switch atomically between *models*: reloading the
``ctr_ensemble`` ensemble with a new config replaces it without loss of availability, and each request runs
wholly through the old or the new ensemble. So a release gets its own composing models, named
``<member>-r<N>`` and ``fusion-r<N>``, beside the ones already served::

    <repo>/
      repository.json            the current release's export manifest + "releases" (current id, history)
      deepfm/ dcnv2/ fusion/     release 1: the export the repository was created with
      deepfm-r2/ dcnv2-r2/ fusion-r2/
      ctr_ensemble/config.pbtxt  steps name the current release's models (the one file the switch rewrites)

Tensor names inside the ensemble (``<member>_prob``) keep the members' own names, so a release changes which
models run, never the wiring. This module only writes files; ``serving.deploy`` tells the server.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import validate
from ctr_ensemble.export.repository import ENSEMBLE_NAME, FUSION_NAME, link_or_copy, read_config, read_manifest
from ctr_ensemble.export.served import served_models
from ctr_ensemble.files import check_name, fsync_dir, fsync_tree, write_atomic

KEEP = 2  # releases whose files stay on disk: the current one and the one `rollback` returns to


@dataclass
class Release:
    """One release: ``models`` maps each member (and ``fusion``) to the Triton model that serves it."""

    id: int
    models: dict[str, str]
    ensemble: str  # the ensemble config.pbtxt text that routes requests to ``models``
    manifest: dict  # the export manifest of this release (members keyed by their own names)
    source: str
    deployed: str

    def entry(self) -> dict:
        return {"id": self.id, "models": self.models, "ensemble": self.ensemble, "manifest": self.manifest,
                "source": self.source, "deployed": self.deployed}

    @classmethod
    def from_entry(cls, e: dict) -> "Release":
        return cls(int(e["id"]), dict(e["models"]), e["ensemble"], e["manifest"], e["source"], e["deployed"])


def served_name(member: str, release_id: int) -> str:
    return member if release_id == 1 else f"{member}-r{release_id}"


def history(repo: Path) -> tuple[int, list[Release]]:
    """(current id, releases kept) of a served repository; a repository never deployed to is release 1."""
    manifest = read_manifest(repo)
    rel = manifest.get("releases")
    if rel is None:
        first = Release(1, served_models(manifest), (repo / ENSEMBLE_NAME / "config.pbtxt").read_text(),
                        _export_part(manifest), str(repo), manifest.get("created", ""))
        return 1, [first]
    return int(rel["current"]), [Release.from_entry(e) for e in rel["history"]]


def _export_part(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "releases"}


def _check_compatible(new: dict, cur: dict, new_repo: Path, repo: Path) -> None:
    """Clients encode rows with the served feature spec: a release that reads them differently is a new deployment."""
    if new.get("feature_spec_fingerprint") != cur.get("feature_spec_fingerprint"):
        raise CtrError(f"{new_repo}: its feature spec differs from the one {repo} serves; clients encode rows with the "
                       "served spec, so a release must keep it (export with the same `data fit` spec, or start a new "
                       "server on the new repository)")
    a, b = read_config(new_repo / ENSEMBLE_NAME), read_config(repo / ENSEMBLE_NAME)
    io = lambda c: sorted((t.name, t.data_type, tuple(t.dims)) for t in [*c.input, *c.output] if t.name != "weights")
    if io(a) != io(b):
        raise CtrError(f"{new_repo}: the ensemble's inputs/outputs {io(a)} differ from the served {io(b)}")


def stage(new_repo: str | Path, repo: str | Path) -> Release:
    """Copy the models of export ``new_repo`` into served repository ``repo`` under the next release's names
    (model files hard-linked where possible) and return that release; nothing served changes yet. The copies are
    validated; on any failure they are removed again."""
    new_repo, repo = Path(new_repo).resolve(), Path(repo).resolve()
    new, cur = read_manifest(new_repo), read_manifest(repo)
    if new.get("releases"):
        raise CtrError(f"{new_repo}: is a served repository with releases; deploy the export it came from")
    _check_compatible(new, cur, new_repo, repo)
    current, kept = history(repo)
    rid = max(r.id for r in kept) + 1
    members = [check_name(m, f"{new_repo / 'repository.json'}: member name") for m in new["members"]]
    models = {m: check_name(served_name(m, rid), "release model name") for m in [*members, FUSION_NAME]}
    written: list[Path] = []
    try:
        for logical, name in models.items():
            dst = repo / name
            if dst.exists():
                if any(name in r.models.values() for r in kept):  # a served model of that name (a member's own)
                    raise CtrError(f"{dst}: already exists and is not a leftover of release {rid}; "
                                   "rename the member (`train --name`) and export again")
                shutil.rmtree(dst)  # left by a deploy that died before it recorded its release
            shutil.copytree(new_repo / logical, dst, copy_function=link_or_copy)
            written.append(dst)
            cfg = read_config(dst)
            cfg.name = name
            write_atomic(dst / "config.pbtxt", text_format.MessageToString(cfg).encode(),
                         what="model config")
        try:  # the release's files are on disk before the switch names them
            for d in written:
                fsync_tree(d)
            fsync_dir(repo)
        except OSError as e:
            raise CtrError(f"{repo}: cannot flush release {rid} to disk ({e.strerror or e})") from e
        ens = read_config(new_repo / ENSEMBLE_NAME)
        for step in ens.ensemble_scheduling.step:
            step.model_name = models[step.model_name]
        problems = [p for p in validate.validate(repo) if any(f"/{n}/" in p or p.endswith(f"/{n}") for n in models.values())]
        if problems:
            raise CtrError(f"{new_repo}: release {rid} does not validate:\n  " + "\n  ".join(problems))
    except BaseException:
        for d in written:
            shutil.rmtree(d, ignore_errors=True)
        raise
    return Release(rid, models, text_format.MessageToString(ens), _export_part(new), str(new_repo),
                   time.strftime("%Y-%m-%dT%H:%M:%S"))


def switch(repo: str | Path, to: Release, releases: list[Release]) -> None:
    """Make ``to`` the release on disk: the ensemble config that names its models, then repository.json
    (its export manifest + the history). Each file is replaced atomically; a server (re)started from here
    serves ``to``."""
    repo = Path(repo)
    ens = text_format.Parse(to.ensemble, mc.ModelConfig())
    write_atomic(repo / ENSEMBLE_NAME / "config.pbtxt", text_format.MessageToString(ens).encode(),
                 what="ensemble config")
    manifest = {**to.manifest, "releases": {"current": to.id, "history": [r.entry() for r in releases]}}
    write_atomic(repo / "repository.json", json.dumps(manifest, indent=2).encode(), what="repository manifest")


def record(releases: list[Release], new: Release, current: int) -> tuple[list[Release], list[Release]]:
    """(kept, dropped): the history after ``new`` became current: the newest ``KEEP`` releases, always including
    ``new`` and the one it replaced (``current``), which rollback goes back to."""
    all_ = [r for r in releases if r.id != new.id] + [new]
    keep_ids = {new.id, current}
    for r in sorted(all_, key=lambda r: -r.id):
        if len(keep_ids) >= KEEP:
            break
        keep_ids.add(r.id)
    return [r for r in all_ if r.id in keep_ids], [r for r in all_ if r.id not in keep_ids]


def remove_models(repo: str | Path, release: Release, keep: set[str] = frozenset()) -> None:
    """Delete a release's model folders (not the names in ``keep``, nor the ensemble's own folder)."""
    for name in release.models.values():
        if name not in keep and name != ENSEMBLE_NAME:
            shutil.rmtree(Path(repo) / name, ignore_errors=True)
