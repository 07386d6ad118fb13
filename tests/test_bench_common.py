"""benchmarks/common.py and publish.py: the stamp every measured page carries, one report written to several
folders, and a run's report published into docs/ with its stamp."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_publish_stamps_the_report_and_results_table_reads_the_stamp(tmp_path):
    import publish
    import results_table

    src, dst = tmp_path / "src", tmp_path / "docs"
    src.mkdir()
    (src / "r.md").write_text("# Soak: x — PASS\n\n- requests served: 12 (768 rows); errors: 0\n")
    (src / "r.csv").write_text("a\n1\n")
    publish.publish(src, dst, ["r.md", "r.csv"], "- commit abc1234, 2026-12-02 02:30 UTC; machine: AMD EPYC, 2 cores")
    lines = (dst / "r.md").read_text().splitlines()
    assert lines[:3] == ["# Soak: x — PASS", "", "- commit abc1234, 2026-12-02 02:30 UTC; machine: AMD EPYC, 2 cores"]
    assert "requests served: 12" in lines[-1] and (dst / "r.csv").read_text() == "a\n1\n"
    st = results_table._generic_stamp(dst / "r.md")
    assert (st.commit, st.date) == ("abc1234", "2026-12-02")
    with pytest.raises(SystemExit, match="lacks r.png"):
        publish.publish(src, dst, ["r.md", "r.png"], "- x")
