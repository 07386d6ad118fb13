"""Triton Model Analyzer over the members' server configurations, its best fed into the load-test sweep.

For each member of the repository (``make demo`` first): a Model Analyzer brute-force search in local launch
mode against the bundled tritonserver, CPU only (``ctr_ensemble.loadtest.model_analyzer``: instances 1/2,
dynamic-batching delay 0/200 µs, preferred batch size none/64; batch 1 and 64, concurrency 1, 2, 4, real held-out
rows). Writes ``<out>/model_analyzer.{md,csv}`` (every measurement, the best per member by throughput at batch
64 and by batch-1 p99) and ``<out>/sweep.yaml``: the default sweep plus one ensemble variant per distinct best
setting, which ``make loadtest`` runs when the file exists (the sweep adds the served AUC Model Analyzer lacks).

Needs ``.venv-ma`` (``make ma-venv``: PyPI ``triton-model-analyzer``) and perf_analyzer (``make perf-venv``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ctr_ensemble.errors import CtrError  # noqa: E402
from ctr_ensemble.export.repository import read_manifest  # noqa: E402
from ctr_ensemble.loadtest import model_analyzer as ma, perf  # noqa: E402
from ctr_ensemble.loadtest.rows import inputs_from_config, load_rows  # noqa: E402
from ctr_ensemble.loadtest.sweep import DEFAULT_VARIANTS, NE_TAU1, SweepConfig  # noqa: E402

COLUMNS = ["member", "config", "instances", "max_queue_delay_us", "preferred_batch_sizes", "batch", "concurrency",
           "rows_per_s", "p99_ms"]
console = Console(width=None if sys.stdout.isatty() else 140)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--data", type=Path, default=Path("artifacts/demo/data/test.tsv"), help="held-out rows perf_analyzer sends")
    p.add_argument("--members", default="", help="comma list (default: every member of the repository)")
    p.add_argument("--analyzer", type=Path, default=ROOT / ".venv-ma" / "bin" / "model-analyzer")
    p.add_argument("--perf-analyzer", type=Path, default=None)
    p.add_argument("--rows", type=int, default=512, help="distinct rows in perf_analyzer's input data")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per member")
    p.add_argument("--out", type=Path, default=Path("artifacts/model_analyzer"))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if not args.analyzer.is_file():
        sys.exit(f"{args.analyzer}: not found; run `make ma-venv` (PyPI triton-model-analyzer)")
    binary = perf.find_binary(args.perf_analyzer)
    reason = perf.why_not_runnable(binary)
    if reason:
        sys.exit(f"perf_analyzer: {reason}")
    manifest = read_manifest(args.repository)
    members = [m.strip() for m in args.members.split(",") if m.strip()] or list(manifest["members"])
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "model_analyzer.log"
    log.write_text("")
    rows, choices = [], {}
    for member in members:
        inputs = inputs_from_config(args.repository, member)
        data = load_rows(args.data, args.repository, member, inputs, args.rows)
        input_json = perf.write_input_data(data, inputs, args.out / f"input-{member}.json")
        work = args.out / "work" / member
        config = ma.prepare(args.repository, member, input_json.resolve(), work.resolve(), binary, ma._search_config())
        t0 = time.perf_counter()
        with console.status(f"model-analyzer profile {member}") as status:
            def show(line, member=member, t0=t0):
                if "Profiling" in line or "Creating model config" in line:
                    status.update(f"{member} [{time.perf_counter() - t0:.0f}s]: {line.split(']', 1)[-1].strip()[:100]}")
            try:
                ma.run(args.analyzer, config, log, args.timeout, show)
            except CtrError as e:
                sys.exit(str(e))
        measured = ma.read_results(work, member)
        rows += measured
        choices[member] = ma.best(measured)
        console.print(f"{member}: {len(measured)} measurements in {time.perf_counter() - t0:.0f}s; best by throughput "
                      f"{choices[member]['throughput'].settings()}")
    report(args, rows, choices)


def report(args, rows: list[ma.Measured], choices: dict) -> None:
    base = {**NE_TAU1}
    variants = ma.sweep_variants(choices, base)
    defaults = SweepConfig(variants=[])
    sweep = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(SweepConfig) if f.name != "variants"}
    sweep["variants"] = [{"name": v.name, "model": v.model, "options": v.options} for v in DEFAULT_VARIANTS] + variants
    (args.out / "sweep.yaml").write_text("# written by benchmarks/model_analyzer.py: the default sweep + Model Analyzer's "
                                         "best member settings\n" + yaml.safe_dump(sweep, sort_keys=False))
    table = [{**dataclasses.asdict(r), "preferred_batch_sizes": " ".join(map(str, r.preferred_batch_sizes)) or "-"} for r in rows]
    with open(args.out / "model_analyzer.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({c: r[c] for c in COLUMNS} for r in table)
    best_rows = [{"member": m, "goal": goal, **{c: getattr(r, c) for c in COLUMNS[1:]}}
                 for m, picks in choices.items() for goal, r in picks.items()]
    md = ["# Model Analyzer: member server configurations", "",
          f"- search: {ma.SEARCH}; batch {ma.BATCHES}, concurrency {ma.CONCURRENCY}; CPU only, local launch of the "
          "bundled tritonserver, real held-out rows",
          "- rows_per_s: Model Analyzer's throughput (infer/sec = rows/s); p99 from perf_analyzer",
          f"- sweep variants written to sweep.yaml: {', '.join(v['name'] for v in variants)}", "",
          "## Best per member", "", "| member | goal | " + " | ".join(COLUMNS[1:]) + " |",
          "|" + "---|" * (len(COLUMNS) + 1)]
    md += ["| " + " | ".join(str(r[c]) for c in ["member", "goal", *COLUMNS[1:]]) + " |" for r in best_rows]
    md += ["", "## Every measurement", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in table]
    (args.out / "model_analyzer.md").write_text("\n".join(md) + "\n")
    t = Table(title="Model Analyzer: best member settings")
    for c in ["member", "goal", *COLUMNS[1:]]:
        t.add_column(c)
    for r in best_rows:
        t.add_row(*(str(r[c]) for c in ["member", "goal", *COLUMNS[1:]]))
    console.print(t)
    console.print(f"wrote {args.out / 'model_analyzer.md'}, {args.out / 'model_analyzer.csv'} and {args.out / 'sweep.yaml'}")


if __name__ == "__main__":
    main()
