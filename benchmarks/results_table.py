"""`make results`: the README's "Results at a glance" table and the member table's AUC column, from stamped files.

Reads what the measuring make targets wrote under ``docs/`` and rewrites two README sections in place:

- between ``<!-- results:begin -->`` and ``<!-- results:end -->``: one row per figure (figure, value, command,
  commit, date, machine);
- between ``<!-- members:begin -->`` and ``<!-- members:end -->``: the last column of the member table (test AUC
  per bench-quality dataset); the other columns are hand-written and kept as they are.

Every figure comes with the commit, date and machine its file was stamped with. A file without all three is left
out (listed under the table as such), never guessed from git history or from another file. Stdlib only.

    python benchmarks/results_table.py            # rewrite README.md
    python benchmarks/results_table.py --check    # exit 1 if README.md is not what the files say
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {"synth": "synthetic", "synthetic": "synthetic", "criteo": "Criteo sample", "avazu": "Avazu sample",
            "movielens": "MovieLens"}


class Unstamped(Exception):
    """The source exists but lacks a commit, date or machine stamp."""


@dataclass(frozen=True)
class Stamp:
    commit: str
    date: str  # YYYY-MM-DD
    machine: str


@dataclass(frozen=True)
class Row:
    figure: str
    value: str
    command: str
    stamp: Stamp
    source: str  # path relative to the root, linked from the figure


def _short_machine(text: str) -> str:
    """'AMD EPYC, 2 cores, 1 torch thread(s) …' → 'AMD EPYC, 2 cores': the hardware, not the run's settings."""
    parts = [p.strip() for p in text.split(",")]
    keep = []
    for p in parts:
        if re.search(r"thread|Python|torch|Linux|load", p):
            break
        keep.append(re.sub(r"\(R\)|\(TM\)", "", p).replace(" Processor", ""))
    return ", ".join(keep) or text.strip()


def bench_md_stamp(md: Path) -> Stamp:
    """The stamp line of a bench-* report: ``- commit C, YYYY-MM-DD HH:MM UTC; machine: M; …`` (machine may be on
    its own ``- machine: M`` line)."""
    if not md.is_file():
        raise FileNotFoundError(md)
    text = md.read_text(encoding="utf-8")
    head = "\n".join(text.splitlines()[:12])
    m = re.search(r"commit[: ]\s*`?([0-9a-f]{7,40}[\w+-]*)`?.*?(\d{4}-\d{2}-\d{2})", head)
    mach = re.search(r"machine: ([^;\n]+)", head)
    if not m or not mach or "unknown" in m.group(1):
        raise Unstamped(f"{md}: no commit/date/machine stamp in its header")
    return Stamp(m.group(1), m.group(2), _short_machine(mach.group(1)))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _rel(root: Path, p: Path) -> str:
    return p.relative_to(root).as_posix()


# ------------------------------------------------------------------------------------------------ sources
def quality(root: Path) -> list[Row]:
    md = root / "docs/bench/quality/quality.md"
    stamp = bench_md_stamp(md)
    by_ds: dict[str, list[dict]] = {}
    for r in read_csv(md.with_name("quality.csv")):
        by_ds.setdefault(r["dataset"], []).append(r)
    rows = []
    for ds, rs in by_ds.items():
        both = [r for r in rs if r.get("fuxictr_auc_mean") and r.get("ours_auc_mean")]
        if not both:
            continue
        ours = sum(float(r["ours_auc_mean"]) for r in both) / len(both)
        fx = sum(float(r["fuxictr_auc_mean"]) for r in both) / len(both)
        bar = sum(r.get("goal") == "True" for r in both)
        rows.append(Row(f"bench-quality, {DATASETS.get(ds, ds)}: mean test AUC, ours (defaults) vs FuxiCTR (BARS)",
                        f"{ours:.4f} vs {fx:.4f}; {bar}/{len(both)} members ≥ FuxiCTR − 1 std",
                        "make bench-quality", stamp, _rel(root, md)))
    return rows


def ensemble(root: Path) -> list[Row]:
    md = root / "docs/bench/ensemble/ensemble.md"
    stamp = bench_md_stamp(md)
    rows = []
    for r in read_csv(md.with_name("ensemble.csv")):
        rows.append(Row(f"bench-ensemble, {DATASETS.get(r['dataset'], r['dataset'])}: fitted fusion vs best member, "
                        f"test AUC ({r['members']})",
                        f"{float(r['fitted_auc']):.4f} vs {r['best_member']} {float(r['best_auc']):.4f} ± "
                        f"{float(r['best_std']):.4f}",
                        "make bench-ensemble", stamp, _rel(root, md)))
    return rows


def defaults(root: Path) -> list[Row]:
    md = root / "docs/bench/defaults/defaults.md"
    stamp = bench_md_stamp(md)
    rs = read_csv(md.with_name("defaults.csv"))
    if not rs:
        return []
    dflt = next((r for r in rs if r["variant"].startswith("defaults")), None)
    best = max(rs, key=lambda r: float(r["mean_auc"]))
    if dflt is None:
        return []
    members = re.search(r"members ([\w,]+)", md.read_text(encoding="utf-8"))
    who = f" ({members.group(1).replace(',', ', ')})" if members else ""
    value = f"{float(dflt['mean_auc']):.4f}"
    if best is not dflt:
        value += f"; best variant `{best['variant']}` {float(best['mean_auc']):.4f}"
    return [Row(f"bench-defaults: product defaults, mean test AUC over 4 datasets{who}", value,
                "make bench-defaults", stamp, _rel(root, md))]


def regularizer(root: Path) -> list[Row]:
    md = root / "docs/bench/regularizer/train.md"
    stamp = bench_md_stamp(md)
    rows = []
    thr = {r["optimizer"]: float(r["samples_per_cpu_s"]) for r in read_csv(md.with_name("train.csv"))
           if r.get("samples_per_cpu_s") and not r.get("error")}
    base, full = thr.get("dense Adam, no regularizer"), thr.get("dense Adam, emb. reg. all rows")
    if base and full:
        rows.append(Row("bench-reg: DCNv2 reference shape, dense Adam, embedding regularizer on all rows vs none",
                        f"{full:,.0f} vs {base:,.0f} samples/CPU-s ({full / base - 1:+.0%})",
                        "make bench-reg", stamp, _rel(root, md)))
    q: dict[str, list[float]] = {}
    for r in read_csv(md.with_name("train_quality.csv")):
        if r.get("val_auc") and not r.get("error"):
            q.setdefault(r["optimizer"], []).append(float(r["val_auc"]))
    if q:
        parts = [f"{k} {sum(v) / len(v):.4f}" for k, v in q.items()]
        rows.append(Row(f"bench-reg: DeepFM val AUC by optimiser ({max(len(v) for v in q.values())} seeds)",
                        "; ".join(parts), "make bench-reg", stamp, _rel(root, md)))
    return rows


def _experiments_stamp(folder: Path) -> tuple[Stamp, str]:
    res = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    md = (folder / "results.md").read_text(encoding="utf-8") if (folder / "results.md").is_file() else ""
    mach = re.search(r" on ([\w.-]+) \((\d+) CPUs", md)
    commit, date = res.get("commit"), res.get("date")
    if not commit or not date or not mach or "unknown" in str(commit):
        raise Unstamped(f"{folder}: results.json/results.md lack a commit, date or machine")
    cmd = re.search(r"`(benchmarks/experiments\.py[^`]*)`", md)
    args = re.sub(r"\s*--out \S+", "", cmd.group(1)).replace("benchmarks/experiments.py", "").strip() if cmd else ""
    make = f'make experiments EXPERIMENTS_ARGS="{args}"' if args else "make experiments"
    return Stamp(str(commit), str(date)[:10], f"{mach.group(1)}, {mach.group(2)} CPUs"), make


def experiments(root: Path) -> list[Row]:
    rows = []
    for folder in sorted((root / "docs/experiments").glob("*/results.json")):
        folder = folder.parent
        try:
            stamp, make = _experiments_stamp(folder)
        except Unstamped as e:
            SKIPPED.append(str(e))
            continue
        res = json.loads((folder / "results.json").read_text(encoding="utf-8"))
        ds = DATASETS.get(res.get("dataset", folder.name), folder.name)
        by = {r["regime"]: r for r in res["rows"] if r.get("model") in ("ensemble",) or r["regime"] == "best-single-member"}
        fit, col, best = by.get("ensemble-fitted"), by.get("ensemble-collaborative"), by.get("best-single-member")
        src = _rel(root, folder / "results.md")
        if fit and col:
            members = " + ".join(fit.get("members", []))
            rows.append(Row(f"experiments, {ds}: test AUC / logloss, independent + fitted fusion vs collaborative "
                            f"({members})",
                            f"{fit['auc_mean']:.4f} / {fit['logloss_mean']:.4f} vs {col['auc_mean']:.4f} / "
                            f"{col['logloss_mean']:.4f}"
                            + (f"; best member {best['auc_mean']:.4f}" if best else ""),
                            make, stamp, src))
        mut = [r for r in res["rows"] if r["regime"] == "mutual-scratch"]
        if mut:
            rows.append(Row(f"experiments, {ds}: mutual learning from scratch vs independent, RelaImp",
                            "; ".join(f"{r['model']} {100 * r['relaimp']:+.2f} %" for r in mut), make, stamp, src))
    return rows


def gpu(root: Path) -> list[Row]:
    md = root / "docs/gpu/gpu_report.md"
    if not md.is_file():
        raise FileNotFoundError(md)
    text = md.read_text(encoding="utf-8")
    commit = re.search(r"^- commit: ([0-9a-f]{7,40})", text, re.M)
    date = re.search(r"^- date: (\d{4}-\d{2}-\d{2})", text, re.M)
    mach = re.search(r"^- machine: (.+)$", text, re.M)
    gpu_name = re.search(r"^- GPU: (.+)$", text, re.M)
    mode = re.search(r"^- mode: (.+)$", text, re.M)
    if not (commit and date and mach) or (mode and "DRY" in mode.group(1)):
        raise Unstamped(f"{md}: no commit/date/machine stamp, or a dry run")
    machine = (gpu_name.group(1).split(",")[0] + ", " if gpu_name else "") + _short_machine(mach.group(1))
    stamp = Stamp(commit.group(1)[:7], date.group(1), machine)
    summary = md.with_name("summary.csv")
    if not summary.is_file():
        return []
    secs = read_csv(summary)
    ok = sum(s.get("status") == "passed" for s in secs)
    return [Row("gpu-check: sections passed", f"{ok}/{len(secs)}", "make gpu-check", stamp, _rel(root, md))]


def _generic_stamp(md: Path) -> Stamp:
    text = md.read_text(encoding="utf-8")
    head = "\n".join(text.splitlines()[:12])
    commit = re.search(r"commit[: ]\s*`?([0-9a-f]{7,40})", head)
    date = re.search(r"(\d{4}-\d{2}-\d{2})", head)
    mach = re.search(r"machine: ([^;\n]+)", head)
    if not (commit and date and mach):
        raise Unstamped(f"{md}: no commit/date/machine stamp in its header")
    return Stamp(commit.group(1), date.group(1), _short_machine(mach.group(1)))


def loadtest(root: Path) -> list[Row]:
    md = root / "docs/loadtest/latency_vs_auc.md"
    if not md.is_file():
        raise FileNotFoundError(md)
    stamp = _generic_stamp(md)
    rs = [r for r in read_csv(md.with_name("latency_vs_auc.csv")) if r.get("status", "ok") in ("ok", "")]
    if not rs:
        return []
    errors = sum(int(float(r.get("errors") or 0)) for r in rs)
    same = sum(r.get("served_auc") == r.get("offline_auc") for r in rs)
    return [Row("loadtest sweep: errors; cells with served AUC = offline AUC", f"{errors}; {same}/{len(rs)}",
                "make loadtest", stamp, _rel(root, md))]


def serve(root: Path) -> list[Row]:
    """bench-serve, one row: per served path, batch-1 p50 over HTTP / gRPC and batch-64 rows/s vs in-process (gRPC)."""
    md = root / "docs/serve/serve.md"
    if not md.is_file():
        raise FileNotFoundError(md)
    stamp = _generic_stamp(md)
    ratios = read_csv(md.with_name("serve_ratios.csv"))
    parts = []
    for target in dict.fromkeys(r["target"] for r in ratios):
        cell = {(r["client"], r["batch"]): r for r in ratios if r["target"] == target}
        if {("triton_http", "1"), ("triton_grpc", "1"), ("triton_grpc", "64")} <= set(cell):
            parts.append(f"{target} {float(cell['triton_http', '1']['p50_ms']):.2f} / "
                         f"{float(cell['triton_grpc', '1']['p50_ms']):.2f} ms, {float(cell['triton_grpc', '64']['rows_per_s_ratio']):.2f}×")
    if not parts:
        return []
    return [Row("bench-serve: batch-1 p50 HTTP / gRPC; batch-64 rows/s vs in-process (gRPC)", "; ".join(parts),
                "make bench-serve", stamp, _rel(root, md))]


def soak(root: Path) -> list[Row]:
    md = root / "docs/soak/soak.md"
    if not md.is_file():
        raise FileNotFoundError(md)
    stamp = _generic_stamp(md)
    text = md.read_text(encoding="utf-8")
    req = re.search(r"requests served: ([\d,]+).*?errors: ([\d,]+)", text)
    if not req:
        return []
    return [Row("soak: requests, errors", f"{req.group(1)}, {req.group(2)}", "make soak", stamp, _rel(root, md))]


def production(root: Path) -> list[Row]:
    """One row: rollout under load (requests, errors, p99 near a switch) and recovery after stub kills."""
    md, rec = root / "docs/rollout/rollout.md", root / "docs/recovery/recovery.md"
    if not md.is_file() or not rec.is_file():
        raise FileNotFoundError(md if not md.is_file() else rec)
    stamp = _generic_stamp(md)
    r = re.search(r"\*\*([\d,]+) requests, (\d+) errors\*\*.*?([\d.]+) ms within 1 s of a switch", md.read_text(encoding="utf-8"))
    kills = read_csv(rec.with_name("recovery.csv"))
    if not r or not kills:
        return []
    secs = "/".join(k["first_ok_s"] for k in kills)
    return [Row("rollout under load: requests, errors, p99 near a switch; stub kills in the container: s to recover",
                f"{r.group(1)}, {r.group(2)}, {r.group(3)} ms; {secs} s", "make rollout; make bench-recovery", stamp,
                _rel(root, md))]


def tune(root: Path) -> list[Row]:
    """One row: per tuning run, the best trial's test AUC vs the defaults' (the validation AUCs are in tune.md)."""
    md = root / "docs/tune/tune.md"
    stamp = bench_md_stamp(md)
    parts = [f"{r['variant'].removeprefix('deepfm-')} {float(r['best_test_auc']):.4f} vs {float(r['default_test_auc']):.4f}"
             + (f", refit {float(r['refit_best_test_auc']):.4f} vs {float(r['refit_default_test_auc']):.4f}"
                if r.get("refit_best_test_auc") else "")
             for r in read_csv(md.with_name("tune.csv"))]
    if not parts:
        return []
    return [Row("bench-tune, MovieLens, DeepFM: test AUC, tuned vs defaults (refit: on train + val)", "; ".join(parts),
                "make bench-tune", stamp, _rel(root, md))]


SOURCES = (quality, ensemble, defaults, regularizer, experiments, tune, serve, loadtest, production, soak, gpu)
SKIPPED: list[str] = []


def collect(root: Path) -> tuple[list[Row], list[str]]:
    SKIPPED.clear()
    rows: list[Row] = []
    for source in SOURCES:
        try:
            rows += source(root)
        except FileNotFoundError:
            continue  # nothing measured there yet: nothing to say
        except Unstamped as e:
            SKIPPED.append(str(e))
        except (KeyError, ValueError, json.JSONDecodeError) as e:
            SKIPPED.append(f"{source.__name__}: unreadable ({type(e).__name__}: {e})")
    return rows, list(SKIPPED)


# ------------------------------------------------------------------------------------------------ rendering
def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_results(root: Path, rows: list[Row], skipped: list[str]) -> str:
    out = ["_Written by `make results` (`benchmarks/results_table.py`) from the stamped files under `docs/`; "
           "do not edit by hand._", "",
           "| figure | value | command | commit | date | machine |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| [{_cell(r.figure)}]({r.source}) | {_cell(r.value)} | `{r.command}` | {r.stamp.commit} | "
                   f"{r.stamp.date} | {_cell(r.stamp.machine)} |")
    if skipped:
        names = sorted({re.sub(r":.*", "", s.replace(str(root) + "/", "")) for s in skipped})
        out += ["", "Left out, no commit/date/machine stamp: " + ", ".join(f"`{n}`" for n in names) + "."]
    return "\n".join(out)


def render_members(root: Path, table: str) -> str:
    """The member table with its last column (test AUC per dataset) rewritten from bench-quality."""
    lines = [ln for ln in table.strip().splitlines() if ln.strip()]
    pre = [ln for ln in lines if not ln.lstrip().startswith("|")]
    rows = [ln for ln in lines if ln.lstrip().startswith("|")]
    if len(rows) < 2:
        return table
    md = root / "docs/bench/quality/quality.md"
    try:
        stamp = bench_md_stamp(md)
        auc: dict[str, dict[str, float]] = {}
        order: list[str] = []
        for r in read_csv(md.with_name("quality.csv")):
            if r["dataset"] not in order:
                order.append(r["dataset"])
            if r.get("ours_auc_mean"):
                auc.setdefault(r["member"], {})[r["dataset"]] = float(r["ours_auc_mean"])
        head = (f"test AUC {' / '.join(DATASETS.get(d, d).split()[0] for d in order)} "
                f"([bench-quality](docs/bench/quality/quality.md), {stamp.commit}, {stamp.date})")
    except (FileNotFoundError, Unstamped, KeyError, ValueError):
        stamp, auc, order = None, {}, []
        head = "test AUC (no stamped `docs/bench/quality/quality.md`: run `make bench-quality`)"

    def split(ln: str) -> list[str]:
        return [c.strip() for c in re.split(r"(?<!\\)\|", ln.strip())[1:-1]]

    header = split(rows[0])
    out = ["| " + " | ".join(header[:-1] + [head]) + " |", "|" + "---|" * len(header)]
    for ln in rows[2:]:
        cells = split(ln)
        name = cells[0].strip("` ")
        vals = auc.get(name, {})
        cells[-1] = " / ".join(f"{vals[d]:.4f}" if d in vals else "–" for d in order) if vals else "not measured"
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(pre + out)


def replace_between(text: str, name: str, body_fn) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise SystemExit(f"README has no {begin} … {end} section")
    inner = text[i + len(begin):j]
    return text[:i + len(begin)] + "\n" + body_fn(inner).strip("\n") + "\n" + text[j:]


def rewrite(root: Path, readme: Path) -> tuple[str, list[Row], list[str]]:
    rows, skipped = collect(root)
    text = readme.read_text(encoding="utf-8")
    text = replace_between(text, "results", lambda _: render_results(root, rows, skipped))
    text = replace_between(text, "members", lambda inner: render_members(root, inner))
    return text, rows, skipped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, default=ROOT, help="Repository root (docs/ and README.md under it).")
    p.add_argument("--readme", type=Path, default=None, help="README to rewrite (default ROOT/README.md).")
    p.add_argument("--check", action="store_true", help="Only check: exit 1 if the README differs.")
    args = p.parse_args(argv)
    root = args.root.resolve()
    readme = args.readme or root / "README.md"
    new, rows, skipped = rewrite(root, readme)
    for s in skipped:
        print(f"left out: {s}", file=sys.stderr)
    if args.check:
        if new != readme.read_text(encoding="utf-8"):
            print(f"{readme}: results out of date; run `make results`", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new, encoding="utf-8")
    print(f"{readme}: {len(rows)} figures written, {len(skipped)} source(s) left out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
