"""Publish a measured report from ``artifacts/`` into ``docs/``, stamped: ``make loadtest`` and ``make soak`` call it
right after their run, so the page in docs/ is the one that target measured, with its commit, date and machine.

Usage: ``python benchmarks/publish.py SRC_DIR DST_DIR FILE...``. The first ``.md`` file gets a stamp line under its
title (``- commit C, YYYY-MM-DD HH:MM UTC; machine: M``); every FILE is copied, a missing one is an error."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, stamp  # noqa: E402


def stamp_line() -> str:
    st = stamp()
    return f"- commit {st['commit']}, {st['date']}; machine: {machine()}"


def publish(src: Path, dst: Path, files: list[str], line: str) -> list[Path]:
    missing = [f for f in files if not (src / f).is_file()]
    if missing:
        raise SystemExit(f"publish: {src} lacks {', '.join(missing)} (did the run finish?)")
    dst.mkdir(parents=True, exist_ok=True)
    out, stamped = [], False
    for f in files:
        if f.endswith(".md") and not stamped:
            lines = (src / f).read_text(encoding="utf-8").splitlines()
            title = lines[:1] if lines and lines[0].startswith("#") else []
            lines = title + ["", line] + lines[len(title):] if title else [line, ""] + lines
            (dst / f).write_text("\n".join(lines) + "\n", encoding="utf-8")
            stamped = True
        else:
            shutil.copy(src / f, dst / f)
        out.append(dst / f)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("files", nargs="+")
    a = p.parse_args()
    for path in publish(a.src, a.dst, a.files, stamp_line()):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
