"""benchmarks/common.py: the stamp every measured page carries, and one report written to several folders."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402


def test_stamp_names_the_checked_out_commit():
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    st = common.stamp()
    assert st["commit"].removesuffix("-dirty") == (head or "unknown")
    assert st["date"].endswith(" UTC") and len(st["date"]) == len("2026-12-02 01:30 UTC")


def test_write_report_writes_every_folder_and_skips_none(tmp_path):
    rows = [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]
    common.write_report([tmp_path / "out", None, tmp_path / "docs"], {"r.md": "# r\n"}, {"r.csv": rows})
    for folder in ("out", "docs"):
        assert (tmp_path / folder / "r.md").read_text() == "# r\n"
        with open(tmp_path / folder / "r.csv") as f:
            assert list(csv.DictReader(f)) == [{"a": "1", "b": "x"}, {"a": "2", "b": "y"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "out"]
