"""``ctr-ensemble deploy`` and ``rollback``: switch a running server to another release without dropping a request.

Triton's explicit model control (``SERVER_FLAGS``) reloads a model by loading the new one first and replacing the
old one only once it is ready; requests already in the old one finish there. A release's composing models have
their own names (``export.release``), so the only model reloaded is the ``ctr_ensemble`` ensemble itself: every
request runs wholly through the old release or wholly through the new one, never a mix. Steps:

1. stage: copy the export's models into the served repository under the release's names, validate them;
2. load them (admin API, needs the key) and wait until each is ready: the old release still serves everything;
3. switch: write the ensemble config naming the new models and repository.json (atomic renames), then reload
   the ensemble: the switch;
4. unload the old release's models (Triton waits for their in-flight requests); delete releases beyond ``KEEP``.

A failure before the switch unloads and deletes what was staged; a failed ensemble reload leaves the old ensemble
serving (Triton keeps a model whose reload fails) and the files are put back. A server restarted later (the
supervisor) loads whatever release the files name: the switch survives restarts.
"""

from __future__ import annotations

import fcntl
import time
from contextlib import contextmanager
from pathlib import Path

from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import release as rel
from ctr_ensemble.export.repository import ENSEMBLE_NAME
from ctr_ensemble.files import write_atomic
from ctr_ensemble.serving.server import admin_headers


@contextmanager
def _locked(repo: Path):
    """One deploy or rollback at a time per repository."""
    with open(repo / ".deploy.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CtrError(f"{repo}: another deploy or rollback is running") from None
        yield


class _Admin:
    """The model-control calls of one server, with the admin key."""

    def __init__(self, url: str, admin_key: str | None, timeout: float) -> None:
        import tritonclient.http as thttp

        self.url, self.timeout = url, timeout
        self.client = thttp.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
        self.headers = admin_headers(admin_key, "http") if admin_key else {}

    def call(self, what: str, fn, *args):
        from tritonclient.utils import InferenceServerException

        try:
            return fn(*args, headers=self.headers)
        except InferenceServerException as e:
            hint = " (is --admin-key / $TRITON_ADMIN_KEY the server's key?)" if "restricted" in str(e) else ""
            raise CtrError(f"{self.url}: {what}: {e.message()}{hint}") from e
        except OSError as e:
            raise CtrError(f"{self.url}: {what}: cannot reach the server ({e})") from e

    def index(self) -> set[str]:
        return {m["name"] for m in self.call("repository index", self.client.get_model_repository_index)}

    def load(self, name: str) -> None:
        self.call(f"load model {name!r}", self.client.load_model, name)

    def unload(self, name: str) -> None:
        self.call(f"unload model {name!r}", self.client.unload_model, name)

    def unload_quietly(self, names: list[str]) -> None:
        """Best effort, while an error is already on its way up: the error is what the user must see."""
        for name in names:
            try:
                self.unload(name)
            except CtrError:
                pass

    def close(self) -> None:
        self.client.close()


def _activate(repo: Path, admin: _Admin, to: rel.Release, releases: list[rel.Release], old: rel.Release) -> dict:
    """Load ``to``'s models, switch the files and the ensemble to it, unload ``old``'s; timings in seconds."""
    new_models = [n for n in to.models.values() if n not in set(old.models.values())]
    t0 = time.monotonic()
    try:
        for name in new_models:
            admin.load(name)
    except CtrError:
        admin.unload_quietly(new_models)
        raise
    t_loaded = time.monotonic()
    # Loaded before the switch, not by the ensemble's reload: a release that fails to load must leave the old
    # ensemble serving (a reload whose new models fail marks the ensemble unavailable). The cost: a Python stub
    # writes __pycache__ into its folder, so the reload below loads that model once more (the old still serving).
    saved = {p: p.read_bytes() for p in (repo / ENSEMBLE_NAME / "config.pbtxt", repo / "repository.json")}
    switch_at = time.time()
    try:
        rel.switch(repo, to, releases)
        admin.load(ENSEMBLE_NAME)  # the switch: Triton replaces the ensemble once the new one is ready
    except CtrError:
        for path, data in saved.items():  # the old ensemble still serves (a failed reload keeps it): match it on disk
            write_atomic(path, data, what="repository file")
        admin.unload_quietly(new_models)
        raise
    t_switched = time.monotonic()
    for name in old.models.values():
        if name not in set(to.models.values()):
            admin.unload(name)
    return {"release": to.id, "from_release": old.id, "models": to.models, "switch_started_unix": round(switch_at, 3),
            "load_s": round(t_loaded - t0, 3), "switch_s": round(t_switched - t_loaded, 3),
            "total_s": round(time.monotonic() - t0, 3)}


def deploy(export_repo: str | Path, repo: str | Path, http_url: str, admin_key: str | None, timeout: float = 300.0) -> dict:
    """Publish export ``export_repo`` to the server at ``http_url`` that serves ``repo``, as its next release."""
    repo = Path(repo).resolve()
    with _locked(repo):
        current, kept = rel.history(repo)
        old = next(r for r in kept if r.id == current)
        admin = _Admin(http_url, admin_key, timeout)
        try:
            new = rel.stage(export_repo, repo)
            try:
                missing = set(new.models.values()) - admin.index()
                if missing:
                    raise CtrError(f"{http_url}: does not serve {repo} (its repository has no {sorted(missing)})")
                releases, dropped = rel.record(kept, new, current)
                report = _activate(repo, admin, new, releases, old)
            except BaseException:
                rel.remove_models(repo, new, keep=set(old.models.values()))
                raise
        finally:
            admin.close()
        for r in dropped:
            rel.remove_models(repo, r, keep={n for k in releases for n in k.models.values()})
        return {**report, "kept": [r.id for r in releases]}


def rollback(repo: str | Path, http_url: str, admin_key: str | None, timeout: float = 300.0) -> dict:
    """Switch the server at ``http_url`` back to the release before the current one (its files are kept)."""
    repo = Path(repo).resolve()
    with _locked(repo):
        current, kept = rel.history(repo)
        earlier = sorted((r for r in kept if r.id != current), key=lambda r: -r.id)
        if not earlier:
            raise CtrError(f"{repo}: has no earlier release to roll back to (releases kept: {[r.id for r in kept]})")
        old = next(r for r in kept if r.id == current)
        admin = _Admin(http_url, admin_key, timeout)
        try:
            return {**_activate(repo, admin, earlier[0], kept, old), "kept": [r.id for r in kept]}
        finally:
            admin.close()
