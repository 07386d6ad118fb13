"""The docs tooling: docs/cli.md matches the CLI's --help, the README's measured tables come from stamped files,
the README stays under 15 KB, and relative links in README.md and docs/*.md resolve."""

from __future__ import annotations

import csv
import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_LIMIT = 15_000  # bytes


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cli_docs():
    return _load("cli_docs")


@pytest.fixture(scope="module")
def results_table():
    return _load("results_table")


# ------------------------------------------------------------------------------------------------ docs/cli.md
def test_cli_md_is_up_to_date_with_the_cli_help(cli_docs):
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert current == cli_docs.render(), (
        "docs/cli.md is out of date with the CLI's --help (a help text, option or command changed): run `make docs-cli`")


def test_cli_md_does_not_depend_on_the_terminal_width(cli_docs, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    narrow = cli_docs.render()
    monkeypatch.setenv("COLUMNS", "250")
    assert cli_docs.render() == narrow


def test_cli_md_has_every_command(cli_docs):
    text = cli_docs.render()
    for path, _, _ in cli_docs._commands():
        assert f"\n## {path}\n" in text
    assert "\n## ctr-ensemble soak\n" in text and "\n## ctr-ensemble data prepare\n" in text


# ------------------------------------------------------------------------------------------------ results table
def _copy_tree(tmp: Path) -> Path:
    root = tmp / "repo"
    root.mkdir()
    shutil.copy(ROOT / "README.md", root / "README.md")
    shutil.copytree(ROOT / "docs", root / "docs", ignore=shutil.ignore_patterns("*.png"))
    return root


def _section(text: str, name: str) -> str:
    return text.split(f"<!-- {name}:begin -->")[1].split(f"<!-- {name}:end -->")[0]


def _rows(text: str) -> list[list[str]]:
    lines = [ln for ln in _section(text, "results").splitlines() if ln.startswith("| [")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines]


def test_results_rows_come_from_the_stamped_files(results_table, tmp_path):
    root = _copy_tree(tmp_path)
    assert results_table.main(["--root", str(root)]) == 0
    text = (root / "README.md").read_text(encoding="utf-8")
    rows = _rows(text)
    assert rows, "no figures written"
    for figure, value, command, commit, date, machine in rows:
        src = root / re.search(r"\]\(([^)]+)\)", figure).group(1)
        body = src.read_text(encoding="utf-8")
        if src.name == "results.md":  # experiments: the stamp is in results.json
            body += (src.parent / "results.json").read_text(encoding="utf-8")
        assert commit in body and date in body, f"{figure}: stamp {commit} {date} not in {src}"
        assert command.startswith("`make ") or command.startswith("`ctr-ensemble ")

    # a figure changed in a file changes the README; nothing is hard-coded
    ens = root / "docs/bench/ensemble/ensemble.csv"
    recs = list(csv.DictReader(ens.open()))
    recs[0]["fitted_auc"] = "0.123456"
    with ens.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(recs[0]))
        w.writeheader()
        w.writerows(recs)
    q = root / "docs/bench/quality/quality.csv"
    qrecs = list(csv.DictReader(q.open()))
    for r in qrecs:
        if r["member"] == "deepfm" and r["dataset"] == qrecs[0]["dataset"]:
            r["ours_auc_mean"] = "0.987654"
    with q.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(qrecs[0]))
        w.writeheader()
        w.writerows(qrecs)
    results_table.main(["--root", str(root)])
    text = (root / "README.md").read_text(encoding="utf-8")
    assert "0.1235 vs" in _section(text, "results")
    deepfm = next(ln for ln in _section(text, "members").splitlines() if ln.startswith("| `deepfm`"))
    assert deepfm.split("|")[-2].strip().startswith("0.9877 /")


def test_a_source_without_a_stamp_is_left_out(results_table, tmp_path):
    root = _copy_tree(tmp_path)
    md = root / "docs/bench/quality/quality.md"
    md.write_text("\n".join(ln for ln in md.read_text().splitlines() if not ln.startswith("- commit")))
    results_table.main(["--root", str(root)])
    text = (root / "README.md").read_text(encoding="utf-8")
    assert not [r for r in _rows(text) if "bench-quality" in r[0]]
    assert "docs/bench/quality/quality.md" in _section(text, "results").split("Left out")[1]
    assert "not measured" in _section(text, "members") or "no stamped" in _section(text, "members")

    # and a source that gains a stamp comes in, with that stamp
    soak = root / "docs/soak/soak.md"
    lines = soak.read_text().splitlines()
    soak.write_text("\n".join(lines[:1] + ["", "- commit abc1234, 2031-01-02 03:04 UTC; machine: Test CPU, 4 cores"]
                              + lines[1:]))
    results_table.main(["--root", str(root)])
    row = next(r for r in _rows((root / "README.md").read_text()) if r[0].startswith("[soak"))
    assert row[3:] == ["abc1234", "2031-01-02", "Test CPU, 4 cores"]


def test_readme_results_are_up_to_date(results_table):
    assert results_table.main(["--root", str(ROOT), "--check"]) == 0, (
        "README.md's results or member AUC column differ from the stamped files under docs/: run `make results`")


# ------------------------------------------------------------------------------------------------ README, links
def test_readme_is_at_most_15_kb():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes (limit {README_LIMIT}): move detail to docs/"


@pytest.mark.parametrize("page", ["README.md", *sorted(p.relative_to(ROOT).as_posix()
                                                        for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_resolve(page):
    path = ROOT / page
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (path.parent / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"{page}: broken relative links {broken}"
