"""How the members' defaults were chosen: bench-quality's datasets, ours only, one default changed at a time.

Each variant is a ``bench_quality`` run (same split files, same code path) with ``--model-set`` /
``--train-set`` / ``--min-count`` overrides; the table gives the test AUC (and NE) per variant × dataset,
averaged over the members, and the mean over datasets. Writes ``<docs>/defaults.md`` and ``defaults.csv``
(``make bench-defaults``: docs/bench/defaults/).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402
from common import write_report  # noqa: E402

# (label, bench_quality arguments): the product's defaults first, then one change each.
VARIANTS = [
    ("defaults (embedding_regularizer 0.01, min_count auto = 2)", []),
    ("embedding_regularizer 0.001", ["--model-set", "embedding_regularizer=0.001"]),
    ("embedding_regularizer 0.03", ["--model-set", "embedding_regularizer=0.03"]),
    ("no regularizer", ["--model-set", "embedding_regularizer=0"]),
    ("batch_norm + dropout 0.2", ["--model-set", "batch_norm=true", "--model-set", "dropout=0.2"]),
    ("BARS tower: embedding_dim 10, MLP 400³", ["--model-set", "embedding_dim=10", "--model-set",
                                                 "hidden=[400, 400, 400]"]),
    ("min_count 1", ["--min-count", "1"]),
    ("min_count 10", ["--min-count", "10"]),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--members", default="deepfm,dcnv2,pnn")
    p.add_argument("--seeds", default="1")
    p.add_argument("--datasets", default=",".join(bq.DATASETS))
    p.add_argument("--out", type=Path, default=Path("artifacts/bench/defaults"))
    p.add_argument("--docs", type=Path, default=None)
    p.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    table = []
    for i, (label, extra) in enumerate(VARIANTS):
        bq.console.rule(f"variant {i + 1}/{len(VARIANTS)}: {label}")
        cfg = bq.parse_args(["--members", a.members, "--seeds", a.seeds, "--datasets", a.datasets, "--no-fuxictr",
                             "--data-root", str(a.data_root), "--out", str(a.out / f"v{i}"), *extra])
        rows = bq.run(cfg)
        rec = {"variant": label}
        for ds in cfg.datasets:
            rs = [r for r in rows if r["dataset"] == ds and r["ours_auc_mean"] is not None]
            rec[f"{ds}_auc"] = statistics.fmean(r["ours_auc_mean"] for r in rs) if rs else None
            rec[f"{ds}_ne"] = statistics.fmean(r["ours_ne_mean"] for r in rs) if rs else None
        aucs = [rec[f"{ds}_auc"] for ds in cfg.datasets if rec[f"{ds}_auc"] is not None]
        rec["mean_auc"] = statistics.fmean(aucs) if aucs else None
        table.append(rec)
    datasets = a.datasets.split(",")
    env = bq.environment(bq.BenchConfig(fuxictr=False))
    md = ["# How the defaults were chosen (`make bench-defaults`)", "",
          f"- commit {env['commit']}, {env['date']}; machine: "
          f"{env['cpu']}, {env['cores']} cores, 1 torch thread per run; {(time.perf_counter() - t0) / 60:.1f} min",
          f"- bench-quality's split files (quick default sizes), ours only; members {a.members}; seeds {a.seeds}; "
          "each cell: test AUC averaged over the members (NE below it); one default changed per row",
          "", "| variant | " + " | ".join(datasets) + " | mean AUC |", "|---|" + "---|" * (len(datasets) + 1)]
    for rec in table:
        cells = [f"{rec[f'{ds}_auc']:.4f} (NE {rec[f'{ds}_ne']:.3f})" if rec[f"{ds}_auc"] is not None else "–"
                 for ds in datasets]
        md.append(f"| {rec['variant']} | " + " | ".join(cells) + f" | {rec['mean_auc']:.4f} |")
    text = "\n".join(md) + "\n"
    write_report([a.out, a.docs], {"defaults.md": text}, {"defaults.csv": table})
    bq.console.print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
