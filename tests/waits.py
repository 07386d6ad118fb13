"""Waiting on conditions, not on the clock: a loaded 2-core machine makes every fixed delay either too short
(a flaky test) or too long (a slow one). ``wait_for`` polls until the condition holds or its deadline passes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """The first truthy value of ``predicate()`` within ``timeout`` s; AssertionError naming ``what`` after it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def read_text(path: str | Path) -> str | None:
    """The file's text, or None if it does not exist (now): no exists() + read_text() race with its removal."""
    try:
        return Path(path).read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` in /proc (R, S, Z, ...), or None once it is gone (reaped)."""
    stat = read_text(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[1].split()[0] if stat else None


def process_gone(pid: int) -> bool:
    """``pid`` has exited: reaped (no /proc entry) or a zombie waiting for its parent."""
    return process_state(pid) in (None, "Z")


def live_in_group(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are not zombies."""
    out = []
    for p in Path("/proc").iterdir():
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):  # gone while we looked
            continue
        if p.name.isdigit() and int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(p.name))
    return out
