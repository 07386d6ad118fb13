"""Small helpers shared by the benchmarks: the stamp (commit, date, machine) of a measured page, writing a
report to its output folders, process-tree memory, Markdown tables."""

from __future__ import annotations

import csv
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, quiet: bool = False) -> None:
    """Run ``ctr-ensemble ARGS`` with this Python from the repository root (echoed, or silent with ``quiet``)."""
    if not quiet:
        print("$ ctr-ensemble " + " ".join(args), flush=True)
    out = subprocess.DEVNULL if quiet else None
    subprocess.run([sys.executable, "-m", "ctr_ensemble.cli", *args], check=True, cwd=ROOT, stdout=out, stderr=out,
                   env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stamp() -> dict:
    """What every measured page carries: the commit the code is at (``-dirty``: tracked files differ from it)
    (changes under docs/ and to README.md, the measured pages, don't count) and the UTC date; ``machine`` separately (``machine()`` or ``cpu_name()``)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        # Measured pages themselves (docs/, README.md) do not make the measured code dirty.
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs",
                                     ":!README.md"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        sha, dirty = "unknown", False
    return {"commit": sha + ("-dirty" if dirty else ""), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def write_report(folders: list[Path | None], texts: dict[str, str], tables: dict[str, list[dict]]) -> None:
    """Write the same report (``texts``: file name → text, ``tables``: file name → rows as CSV) into each
    folder (``None`` entries skipped: an optional ``--docs``)."""
    for folder in (f for f in folders if f is not None):
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            (folder / name).write_text(text)
        for name, rows in tables.items():
            with open(folder / name, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
                w.writeheader()
                w.writerows(rows)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} CPUs, {gpu}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {platform.system()} {platform.release()}")


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def _kb(pid: int, path: str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TreeMemory:
    """Memory of a process and all its descendants, sampled from /proc in a thread every ``period`` s:
    the sum of PSS (proportional set size: shared pages such as libraries counted once overall) and the
    largest single-process RSS. ``timeline`` holds (seconds, PSS sum MB, processes)."""

    def __init__(self, pid: int, period: float = 0.25):
        self.pid, self.period = pid, period
        self.peak_pss_mb = 0.0
        self.peak_rss_mb = 0.0
        self.timeline: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        kids, out, todo = _children(), [], [self.pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo += kids.get(p, [])
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = self._tree()
            pss = sum(_kb(p, "smaps_rollup", "Pss:") for p in pids) / 1024
            rss = max((_kb(p, "status", "VmRSS:") for p in pids), default=0) / 1024
            if pss:
                self.peak_pss_mb = max(self.peak_pss_mb, pss)
                self.peak_rss_mb = max(self.peak_rss_mb, rss)
                self.timeline.append((time.perf_counter() - self._t0, pss, len(pids)))
            self._stop.wait(self.period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def md_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else (f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}")
    return str(v)
