"""Durable file and folder writes, with an optional SHA-256 sidecar, and the checked read that goes with them.

Durable means: a reader never sees half a file, and after a crash (power loss included) at any point the
file is either the previous one or the new one, whole. Every write goes to a temp file that is fsynced,
renamed over the target, and then the folder holding it is fsynced (a rename lives in the folder: without
that flush it can vanish with a crash). A folder (a Triton repository) is published as a new version
beside it and switched to by an atomic symlink flip (``publish_dir``).

Low level on purpose (standard library and ``errors`` only, no torch): data, models and training write through it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import zlib
from pathlib import Path

from ctr_ensemble.errors import CtrError


# A name that becomes a folder of the Triton repository (a member's model) and part of file names: no path
# separator, no leading dot (so no ".." and no hidden folder), nothing a shell or a URL would mangle.
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def check_name(name: object, what: str) -> str:
    """``name`` if it is a valid model name (``MODEL_NAME``), else a CtrError naming ``what`` carried it."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise CtrError(f"{what}: {name!r} is not a valid model name; it becomes a folder of the Triton repository, "
                       "so use letters, digits, '_', '.' and '-', starting with a letter, a digit or '_' "
                       "(^[A-Za-z0-9_][A-Za-z0-9_.-]*$)")
    return name


def sha256_path(path: Path) -> Path:
    """The checksum sidecar of ``path``: ``<path>.sha256``."""
    return path.with_name(path.name + ".sha256")


def hardlink_or_copy(src: str | Path, dst: str | Path) -> str:
    """Hard-link ``src`` at ``dst`` (a model file that is never rewritten in place), or copy it across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return str(dst)


def fsync_dir(path: str | Path) -> None:
    """Flush the folder ``path`` itself (its entries: a rename, a new file) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush the data of the file ``path`` (written by someone else: torch, onnx, shutil) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Flush every file and folder under ``root`` (``root`` included), children before their folder."""
    for folder, _, names in os.walk(root, topdown=False):
        for name in names:
            p = os.path.join(folder, name)
            if not os.path.islink(p):
                fsync_file(p)
        fsync_dir(folder)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def listed_digests(sha: Path) -> list[str]:
    """The SHA-256 digests a sidecar lists (one per line; more than one only after an interrupted write)."""
    return [t for t in sha.read_bytes().decode("ascii", "replace").split() if _HEX64.fullmatch(t)]


def _digests(path: Path) -> list[str]:
    """The digests the file at ``path`` may have now: what its sidecar lists, else its own (no sidecar)."""
    sha = sha256_path(path)
    if sha.is_file():
        return listed_digests(sha)
    return [hashlib.sha256(path.read_bytes()).hexdigest()] if path.is_file() else []


def _sidecar(*digests: str) -> bytes:
    return "".join(f"{d}\n" for d in dict.fromkeys(digests)).encode()


def write_atomic(path: str | Path, data: bytes, checksum: bool = False, what: str = "file") -> dict:
    """Write ``data`` to ``path`` durably (temp file, fsync, rename, fsync of the folder); returns its size and
    CRC-32 (``bytes``, ``crc32``, what a manifest records). A failed write (disk full, quota, I/O error) before
    the rename removes its temp files and raises CtrError naming ``what``: the previous file is untouched.

    ``checksum`` also keeps the sidecar ``<path>.sha256``, which may list more than one digest: the file is
    sound when its digest is one of them. The new sidecar lists the new digest *and* the old file's, and is
    renamed in (and its folder flushed) before the data file is, so a crash between the two renames leaves
    the old file verifying; after the data rename the sidecar is rewritten with the new digest alone. Every
    crash point thus leaves either the old pair or the new pair verifiable (at worst a sidecar with one
    digest too many), never a sound file that fails its checksum, nor a damaged one that passes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    sha, sha_tmp = sha256_path(path), sha256_path(tmp)
    digest = hashlib.sha256(data).hexdigest()
    had_sha, renamed_sha = sha.exists(), False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_synced(tmp, data)
        if checksum:
            _write_synced(sha_tmp, _sidecar(digest, *_digests(path)))
            os.replace(sha_tmp, sha)
            renamed_sha = True
            fsync_dir(path.parent)  # the sidecar that accepts both files is on disk before the data file moves
        os.replace(tmp, path)
    except OSError as e:
        for p in (tmp, sha_tmp, *([sha] if renamed_sha and not had_sha else [])):
            p.unlink(missing_ok=True)
        raise CtrError(f"{path}: cannot write the {what} ({e.strerror or e}); "
                       f"{f'the previous {what} there is intact' if path.exists() else 'nothing was written'}") from e
    try:
        fsync_dir(path.parent)
    except OSError as e:
        raise CtrError(f"{path}: the new {what} is in place but may not be on disk yet: cannot flush its folder "
                       f"{path.parent} ({e.strerror or e})") from e
    if checksum:
        _trim_sidecar(sha, sha_tmp, digest)
    return {"bytes": len(data), "crc32": zlib.crc32(data)}


def _trim_sidecar(sha: Path, sha_tmp: Path, digest: str) -> None:
    """Rewrite the sidecar with ``digest`` alone. Best effort: the data file is committed already and the
    longer sidecar it replaces verifies it too, so a failure here is left for the next write to tidy."""
    try:
        _write_synced(sha_tmp, _sidecar(digest))
        os.replace(sha_tmp, sha)
        fsync_dir(sha.parent)
    except OSError:
        sha_tmp.unlink(missing_ok=True)


def read_checked(path: str | Path, what: str = "file") -> bytes:
    """The bytes of ``path``, verified against its ``.sha256`` sidecar when it has one (``write_atomic``)."""
    path = Path(path)
    if not path.is_file():
        raise CtrError(f"{path}: {what} not found")
    data = path.read_bytes()
    sha = sha256_path(path)
    if sha.is_file():
        want = listed_digests(sha)
        got = hashlib.sha256(data).hexdigest()
        if got not in want:
            listed = want[0][:12] + "…" if want else "no digest"
            raise CtrError(f"{path}: {what} is corrupt (sha256 {got[:12]}… does not match {sha.name}: {listed})")
    return data


VERSIONS = ".versions"


def versions_dir(path: str | Path) -> Path:
    """Where the versions of the folder published at ``path`` live: ``<path>.versions/<n>/``."""
    path = Path(path)
    return path.with_name(path.name + VERSIONS)


def _target(link: Path) -> Path:
    return Path(os.path.normpath(link.parent / os.readlink(link)))


def current_version(path: str | Path) -> Path | None:
    """The version folder ``path`` shows now; None when ``path`` is no published folder (missing, or plain)."""
    path = Path(os.path.abspath(path))
    if path.is_symlink() and (target := _target(path)).parent == versions_dir(path):
        return target
    return None


def published_path(path: str | Path) -> Path:
    """``path`` made absolute without following its symlink when the symlink is ours (``current_version``);
    any other symlink is followed, so a folder linked elsewhere by hand is published where it really is."""
    path = Path(os.path.abspath(path))
    for _ in range(40):  # as many links as the kernel follows
        if not path.is_symlink() or current_version(path) is not None:
            return path
        path = _target(path)  # one link at a time: the folder it names may be published itself
    raise CtrError(f"{path}: too many levels of symbolic links")


def version_dirs(path: str | Path) -> list[Path]:
    """The version folders kept for ``path``, oldest first (the last one is not always the current one)."""
    versions = versions_dir(published_path(path))
    found = [p for p in versions.iterdir() if p.name.isdigit()] if versions.is_dir() else []
    return sorted(found, key=lambda p: int(p.name))


def flip(path: str | Path, version: str | Path) -> None:
    """Point the symlink ``path`` at ``version`` (a folder of ``versions_dir(path)``) atomically and durably:
    a new symlink renamed over it, then its folder flushed. Also how a published folder is rolled back."""
    path = Path(os.path.abspath(path))
    _swap_link(path, version)
    fsync_dir(path.parent)


def _swap_link(path: Path, version: str | Path) -> None:
    """Rename a new symlink to ``version`` (relative: the folders can move together) over ``path``."""
    link = path.with_name(f".{path.name}.link-{os.getpid()}")
    link.unlink(missing_ok=True)
    os.symlink(f"{versions_dir(path).name}/{Path(version).name}", link)
    try:
        os.replace(link, path)
    except OSError:
        link.unlink(missing_ok=True)
        raise


def publish_dir(staging: str | Path, path: str | Path, what: str = "folder") -> Path:
    """Make the complete folder ``staging`` (on the file system of ``path``) what ``path`` shows, atomically and
    durably; returns the new version folder. ``staging`` is flushed (``fsync_tree``) and renamed to
    ``<path>.versions/<n>``, then the symlink ``path`` is flipped to it (as ``flip``): a reader sees the old
    version or the new one, never none and never a mix. The version shown before is kept (a rollback target,
    and a server started on it keeps its files); older ones are pruned. A plain folder at ``path`` (the layout
    before versions) is first moved in as a version of its own.

    A failure at any step up to the flushed flip undoes every step done, in reverse (the previous folder or
    symlink back at ``path``, ``staging`` back where it was, for its caller to remove, a versions folder made
    now removed again) and raises CtrError naming ``path``. Pruning is best effort: a version left behind is
    pruned by the next publish."""
    staging, path = Path(staging), published_path(path)
    if path.exists() and not path.is_dir():
        raise CtrError(f"{path}: exists and is not a folder; the {what} was not published")
    versions = versions_dir(path)
    undo: list = []
    previous = current_version(path)
    try:
        fsync_tree(staging)
        if not versions.is_dir():
            os.mkdir(versions)
            undo.append(lambda: os.rmdir(versions))
        n = _next_version(versions)
        if previous is None and path.is_dir():  # the older layout: the plain folder becomes a version
            moved = previous = versions / str(n)
            n += 1
            os.rename(path, moved)
            undo.append(lambda: os.rename(moved, path))
        new = versions / str(n)
        os.rename(staging, new)
        undo.append(lambda: os.rename(new, staging))
        fsync_dir(versions)
        fsync_dir(path.parent)  # the version is on disk before any symlink names it
        shown = os.readlink(path) if path.is_symlink() else None
        _swap_link(path, new)
        undo.append(lambda: _swap_link(path, shown) if shown is not None else path.unlink())
        fsync_dir(path.parent)  # the flip is durable: only now is the new version published
    except OSError as e:
        raise CtrError(_failed(path, what, e, previous, _undo(undo, path))) from e
    _prune(versions, keep={new.name, previous.name if previous else new.name})
    return new


def _next_version(versions: Path) -> int:
    return 1 + max((int(p.name) for p in versions.iterdir() if p.name.isdigit()), default=0)


def _undo(steps: list, path: Path) -> list[str]:
    """Run the undo steps, last first; the ones that failed, as text."""
    failed = []
    for step in reversed(steps):
        try:
            step()
        except OSError as e:
            failed.append(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}")
    try:
        fsync_dir(path.parent)
    except OSError as e:
        failed.append(f"flushing {path.parent}: {e.strerror or e}")
    return failed


def _failed(path: Path, what: str, e: OSError, previous: Path | None, failed: list[str]) -> str:
    cause = f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}"
    if failed:
        return (f"{path}: cannot publish the {what} ({cause}), and undoing it failed too ({'; '.join(failed)}): "
                f"check {path} and {versions_dir(path)} by hand")
    kept = f"the previous {what} is still in place" if previous is not None else "nothing was published there"
    return f"{path}: cannot publish the {what} ({cause}); {kept}"


def _prune(versions: Path, keep: set[str]) -> None:
    """Remove the versions not in ``keep``: each renamed to a hidden trash name first (so a folder that
    looks like a version is always whole), then deleted; leftovers of an earlier prune go too."""
    try:
        entries = list(versions.iterdir())
    except OSError:
        return
    for p in entries:
        if p.name.isdigit() and p.name not in keep:
            trash = versions / f".trash-{p.name}-{os.getpid()}"
            try:
                os.rename(p, trash)
            except OSError:
                continue
        elif p.name.startswith(".trash-"):
            trash = p
        else:
            continue
        shutil.rmtree(trash, ignore_errors=True)


def remove(path: str | Path) -> None:
    """Delete a file written by ``write_atomic`` and its sidecar (missing is fine)."""
    path = Path(path)
    for p in (sha256_path(path), path):
        p.unlink(missing_ok=True)
