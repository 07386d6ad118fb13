"""Durable writes: a failure or a crash injected at every file-system step of a checkpoint, feature spec,
prepared-data manifest and repository write leaves a sound file or repository: the previous one, or (past the
commit point) the new one; a failed repository publish puts the previous state back exactly.

Each test runs the write once to list its steps (every call of ``STEPS``), then once per step with that
call failing (OSError) or the process "dying" there (``Crash``: nothing is cleaned up or undone)."""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from ctr_ensemble import files
from ctr_ensemble.data.prepared.manifest import write_json_atomic
from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import validate
from ctr_ensemble.export.repository import RepoOptions, publish, read_manifest, reconfigure_repository, write_repository
from ctr_ensemble.models import checkpoint

STEPS = ("open", "fsync", "replace", "rename", "symlink", "mkdir", "rmdir", "unlink")  # of os


class Crash(BaseException):
    """The process dying at a step: no ``except OSError`` catches it, so nothing is cleaned up or undone."""


class Steps:
    """Runs a write with the calls of ``STEPS`` (and files.py's ``open``: the temp-file writes) counted;
    ``fail_at=k`` makes the k-th call raise ``error`` (default: OSError EIO) instead of running. A flush
    changes nothing a test can see short of a power cut, so ``fsync`` is counted but not run: fast."""

    def __init__(self, monkeypatch, fail_at: int | None = None, error: BaseException | None = None):
        self.mp, self.fail_at, self.error, self.calls = monkeypatch, fail_at, error, []

    def run(self, fn, *args):
        with self.mp.context() as mp:
            for name in STEPS:
                mp.setattr(os, name, self._step(name, getattr(os, name)))
            mp.setattr(files, "open", self._step("write", builtins.open), raising=False)
            return fn(*args)

    def _step(self, name, real):
        def step(*a, **k):
            arg = os.path.basename(os.fspath(a[0])) if a and isinstance(a[0], (str, os.PathLike)) else ""
            self.calls.append(f"#{len(self.calls)} {name}({arg})")
            if len(self.calls) - 1 == self.fail_at:
                raise self.error or OSError(errno.EIO, f"injected I/O error at {self.calls[-1]}")
            return None if name == "fsync" else real(*a, **k)
        return step


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# --- files: checkpoint, feature spec, prepared-data manifest -------------------------------------------------

@pytest.fixture(scope="module")
def artifacts(tiny_checkpoints, tiny_spec):
    """kind → (file name, write(path, version 0 | 1), read(path) → what identifies the version; verifies)."""
    specs = [tiny_spec, replace(tiny_spec, min_count=tiny_spec.min_count + 7)]
    return {
        "checkpoint": ("m.pt", lambda p, i: checkpoint.save(tiny_checkpoints[i], p), lambda p: checkpoint.load(p).name),
        "feature spec": ("feature_spec.json", lambda p, i: specs[i].save(p), lambda p: FeatureSpec.load(p).min_count),
        "prepared-data manifest": ("manifest.json", lambda p, i: write_json_atomic(p, {"v": i}, "prepared-data manifest"),
                                   lambda p: json.loads(p.read_text())["v"]),
    }


def _with_version_0(folder: Path, name: str, write) -> Path:
    folder.mkdir()
    write(folder / name, 0)
    return folder / name


@pytest.mark.parametrize("how", ["fails", "crashes"])
@pytest.mark.parametrize("kind", ["checkpoint", "feature spec", "prepared-data manifest"])
def test_every_step_of_a_file_write_failing_or_crashing_leaves_a_sound_file(kind, how, artifacts, tmp_path, monkeypatch):
    name, write, read = artifacts[kind]
    count = Steps(monkeypatch)
    path = _with_version_0(tmp_path / "count", name, write)
    old = read(path)
    count.run(write, path, 1)
    new = read(path)
    assert old != new and len(count.calls) >= 4, count.calls  # write, fsync, rename, fsync of the folder at least
    seen = set()
    for k, step in enumerate(count.calls):
        path = _with_version_0(tmp_path / f"k{k}", name, write)
        before = listing(path.parent)
        if how == "crashes":
            with pytest.raises(Crash):
                Steps(monkeypatch, fail_at=k, error=Crash()).run(write, path, 1)
            got = read(path)  # loads, and a checkpoint verifies its checksum: the old one or the new one
            assert got in (old, new), step
            write(path, 1)  # the next write tidies up: the sidecar lists the new file's digest alone
            assert read(path) == new
            if kind == "checkpoint":
                assert len(files.listed_digests(files.sha256_path(path))) == 1
        else:
            try:
                Steps(monkeypatch, fail_at=k).run(write, path, 1)
                got = read(path)  # only tidying the sidecar after the commit is best effort
                assert got == new, step
            except CtrError as e:
                assert str(path) in str(e), step
                got = read(path)
                assert got == (old if "previous" in str(e) else new), (step, str(e))
                assert ("previous" in str(e)) or "may not be on disk yet" in str(e), (step, str(e))
            assert listing(path.parent) == before, step  # no temp file left behind
        seen.add(got)
    assert seen == {old, new}  # the steps before the commit point and after it were both hit


def test_a_file_write_flushes_the_file_and_its_sidecar_before_renaming_and_the_folder_after(tmp_path, tiny_checkpoints, monkeypatch):
    path = checkpoint.save(tiny_checkpoints[0], tmp_path / "m.pt")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (real_replace(a, b), events.append(("rename", Path(b).name)))[0])
    checkpoint.save(tiny_checkpoints[1], path)
    monkeypatch.undo()
    ino = lambda p: os.stat(p).st_ino  # noqa: E731
    data, folder, sidecar = ino(path), ("fsync", ino(tmp_path)), ino(files.sha256_path(path))
    renamed = events.index(("rename", "m.pt"))
    sha_renamed = events.index(("rename", "m.pt.sha256"))  # the first: it lists the old and the new digest
    assert events.index(("fsync", data)) < renamed
    assert sha_renamed < renamed and folder in events[sha_renamed:renamed]  # on disk before the data moves
    assert folder in events[renamed:]
    assert ("fsync", sidecar) in events  # the trimmed sidecar, flushed before its own rename
    assert sum(e[0] == "fsync" for e in events) == 6  # data, sidecar, folder, folder, trimmed sidecar, folder
    assert checkpoint.load(path).name == tiny_checkpoints[1].name


def test_a_sidecar_left_by_an_interrupted_write_accepts_the_old_or_the_new_file_and_nothing_else(tmp_path):
    path = tmp_path / "f.bin"
    files.write_atomic(path, b"old", checksum=True)
    digest = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    files.sha256_path(path).write_text(f"{digest(b'new')}\n{digest(b'old')}\n")  # as a crash leaves it
    assert files.read_checked(path) == b"old"
    path.write_bytes(b"new")
    assert files.read_checked(path) == b"new"
    path.write_bytes(b"bad")
    with pytest.raises(CtrError, match=f"{path}: file is corrupt"):
        files.read_checked(path)


# --- repositories ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source(tiny_checkpoints, tmp_path_factory) -> Path:
    """A real (small) repository, written once: the content of every version below."""
    repo = tmp_path_factory.mktemp("durable") / "source"
    write_repository(tiny_checkpoints, repo, RepoOptions(max_batch_size=256, fusion_kind="cpu"))
    return repo


def _version(source: Path, dest: Path, marker: str) -> Path:
    """A copy of ``source`` (hard links: fast) whose own repository.json carries ``marker``."""
    shutil.copytree(source, dest, copy_function=os.link)
    manifest = json.loads((dest / "repository.json").read_text())
    (dest / "repository.json").unlink()  # not written through the link into ``source``
    (dest / "repository.json").write_text(json.dumps({**manifest, "marker": marker}, indent=2))
    return dest


def _tree(repo: Path) -> dict:
    """Every file a reader of ``repo`` sees (through its symlink), with its bytes."""
    return {str(Path(d, n).relative_to(repo)): Path(d, n).read_bytes() for d, _, names in os.walk(repo) for n in names}


@pytest.fixture(scope="module")
def trees(source, tmp_path_factory) -> dict:
    """marker → the files of that version, each one checked once as Triton would load it."""
    out = {}
    for marker in ("older", "old", "new", "next"):
        version = _version(source, tmp_path_factory.mktemp("trees") / marker, marker)
        validate.check(version)
        out[marker] = _tree(version)
    return out


def _shown(repo: Path, trees: dict) -> str:
    """Which version ``repo`` shows, whole: byte for byte one of ``trees`` (so it validates), never a mix."""
    tree = _tree(repo)
    found = [m for m, t in trees.items() if t == tree]
    assert found, f"{repo} shows no whole version: {sorted(tree)[:5]}…"
    assert read_manifest(repo)["marker"] == found[0]
    return found[0]


def _marker(repo: Path) -> str:
    validate.check(repo)  # Triton would load it
    return read_manifest(repo)["marker"]


def _layout(source: Path, root: Path, state: str) -> tuple[Path, Path]:
    """``root/repo`` in ``state`` showing the version "old", and a complete staging folder "new" beside it."""
    repo = root / "repo"
    root.mkdir()
    if state == "versions":  # two exports before: "older" kept as the rollback target, "old" shown
        versions = files.versions_dir(repo)
        versions.mkdir()
        _version(source, versions / "1", "older")
        _version(source, versions / "2", "old")
        os.symlink(f"{versions.name}/2", repo)
    elif state == "plain folder":  # written before versions existed
        _version(source, repo, "old")
    return repo, _version(source, root / "repo.staging-1", "new")


def snapshot(root: Path) -> dict:
    """Every entry under ``root``: a file's bytes, a symlink's target, a folder."""
    out = {}
    for folder, dirs, names in os.walk(root):
        for n in dirs + names:
            p = Path(folder, n)
            out[str(p.relative_to(root))] = ("->", os.readlink(p)) if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


STATES = ["versions", "plain folder", "nothing"]


@pytest.mark.parametrize("state", STATES)
def test_every_failed_step_of_a_repository_publish_puts_the_previous_state_back(state, source, trees, tmp_path, monkeypatch):
    count = Steps(monkeypatch)
    repo, staging = _layout(source, tmp_path / "count", state)
    new = count.run(publish, staging, repo)
    assert _marker(repo) == "new" and files.current_version(repo) == new
    assert any("symlink" in c for c in count.calls) and any("replace(.repo.link-" in c for c in count.calls)
    outcomes = {"rolled back": 0, "published": 0}
    for k, step in enumerate(count.calls):
        root = tmp_path / f"k{k}"
        repo, staging = _layout(source, root, state)
        before = snapshot(root)
        try:
            Steps(monkeypatch, fail_at=k).run(publish, staging, repo)
        except CtrError as e:
            assert str(repo) in str(e) and "undoing it failed" not in str(e), (step, str(e))
            assert snapshot(root) == before, step  # exactly: symlink, versions, staging back for its caller
            assert state == "nothing" and not repo.exists() or _shown(repo, trees) == "old", step
            outcomes["rolled back"] += 1
        else:  # pruning is the only best-effort step (versions: "older" goes)
            assert _shown(repo, trees) == "new", step
            assert files.current_version(repo) is not None, step
            outcomes["published"] += 1
            Steps(monkeypatch).run(publish, _version(source, root / "repo.staging-2", "next"), repo)  # it tidies up
            assert _shown(repo, trees) == "next"
            assert listing(root) == ["repo", "repo.versions"], step  # no staging, no temp symlink
            kept = listing(files.versions_dir(repo))
            assert len(kept) == 2 and not any(n.startswith(".") for n in kept), (step, kept)
    assert outcomes["rolled back"] >= 10 and (outcomes["published"] > 0) == (state == "versions"), outcomes


@pytest.mark.parametrize("state", STATES)
def test_a_crash_at_every_step_of_a_repository_publish_leaves_a_whole_repository(state, source, trees, tmp_path, monkeypatch):
    count = Steps(monkeypatch)
    repo, staging = _layout(source, tmp_path / "count", state)
    count.run(publish, staging, repo)
    seen = set()
    for k, step in enumerate(count.calls):
        root = tmp_path / f"k{k}"
        repo, staging = _layout(source, root, state)
        with pytest.raises(Crash):
            Steps(monkeypatch, fail_at=k, error=Crash()).run(publish, staging, repo)
        if repo.exists():
            seen.add(_shown(repo, trees))  # the old one or the new one, whole: never a mix, never half
        else:  # only where there was none, or while a plain folder is moved in (two renames, not one)
            assert state != "versions", step
            seen.add(None)
        Steps(monkeypatch).run(publish, _version(source, root / "repo.staging-2", "next"), repo)  # the next one recovers
        assert _shown(repo, trees) == "next", step
    assert {"old", "new"} <= seen if state != "nothing" else seen == {None, "new"}


def test_publish_flushes_every_file_and_folder_of_the_version_and_the_flip(source, tmp_path, monkeypatch):
    repo, staging = _layout(source, tmp_path / "root", "versions")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (real_replace(a, b), events.append(("rename", Path(b).name)))[0])
    new = publish(staging, repo)
    monkeypatch.undo()
    synced = {e[1] for e in events if e[0] == "fsync"}
    version = [new, *new.rglob("*")]
    assert {os.stat(p).st_ino for p in version} <= synced and len(version) > 15
    flipped = events.index(("rename", "repo"))
    assert ("fsync", os.stat(files.versions_dir(repo)).st_ino) in events[:flipped]
    assert ("fsync", os.stat(repo.parent).st_ino) in events[flipped:]
    assert listing(files.versions_dir(repo)) == ["2", "3"]  # the one shown before is kept, "older" pruned
    assert os.readlink(repo) == "repo.versions/3"  # relative: the folder can move


def test_export_and_reconfigure_fail_at_the_flip_and_keep_the_previous_repository(source, tiny_checkpoints, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    reconfigure_repository(source, repo, RepoOptions(max_batch_size=256, fusion_kind="cpu", tau=0.5))
    before = snapshot(tmp_path)
    real = os.replace

    def flip_fails(a, b, **k):  # every flip of ``repo`` fails (a read-only mount, say): undoing needs none
        if Path(b) == repo:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(a, b, **k)

    monkeypatch.setattr(os, "replace", flip_fails)
    with pytest.raises(CtrError, match=f"{repo}: cannot publish the model repository \\(Read-only file system\\); "
                                       "the previous model repository is still in place"):
        write_repository(tiny_checkpoints, repo, RepoOptions(max_batch_size=256, fusion_kind="cpu"))
    with pytest.raises(CtrError, match=f"{repo}: cannot publish .*still in place"):
        reconfigure_repository(repo, repo, RepoOptions(max_batch_size=256, fusion_kind="cpu", tau=2.0))
    monkeypatch.undo()
    assert snapshot(tmp_path) == before  # no staging folder, no temp symlink, no new version
    validate.check(repo)
    assert read_manifest(repo)["fusion"]["tau"] == 0.5
    reconfigure_repository(repo, repo, RepoOptions(max_batch_size=256, fusion_kind="cpu", tau=2.0))  # in place
    assert read_manifest(repo)["fusion"]["tau"] == 2.0 and listing(files.versions_dir(repo)) == ["1", "2"]


def test_a_plain_folder_becomes_a_version_and_a_symlink_made_by_hand_is_followed(source, tmp_path):
    plain = _version(source, tmp_path / "data" / "models", "old")
    link = tmp_path / "repo"
    os.symlink(plain, link)  # the user's own symlink to where the repository really lives
    new = publish(_version(source, tmp_path / "data" / "models.staging-1", "new"), link)
    assert new == tmp_path / "data" / "models.versions" / "2" and _marker(link) == "new"
    assert os.readlink(link) == str(plain) and os.readlink(plain) == "models.versions/2"
    assert read_manifest(files.versions_dir(plain) / "1")["marker"] == "old"  # the plain folder, kept whole
    assert files.version_dirs(link) == [files.versions_dir(plain) / "1", new]
