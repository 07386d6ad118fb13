"""The served fusions on bench-quality's datasets: the two best members (by validation AUC) of each dataset,
fused by the fitted rule (``export --fit-fusion``'s fit on the validation split), by NE at τ = 1 and by the mean.

For every dataset × seed: both members train with the product's defaults (``train_member``, as in
``make bench-quality``), their PyTorch probabilities on val and test are fused with ``ctr_ensemble.export.
fusion_fit`` (the fit chooses on validation logloss among its optimised rules, τ = 1, the mean and each member
alone), and every row is scored on the test split. The two members are chosen by their mean validation AUC in
``--quality-runs`` (bench-quality's per-run table), never by test AUC.

The bar (issue 13): on every dataset the fitted ensemble's mean test AUC ≥ its best member's − 1 std, and it
beats the best member by more than 2 std on at least half of the datasets (the best member: the higher mean test
AUC of the two; std: that member's seed std). Writes ``<out>/ensemble.{md,csv}`` and ``ensemble_runs.csv``
(``make bench-ensemble``: docs/bench/ensemble/).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402
from common import write_report  # noqa: E402

from ctr_ensemble import metrics, models  # noqa: E402
from ctr_ensemble.data.encode import encode_file  # noqa: E402
from ctr_ensemble.data.fit import fit  # noqa: E402
from ctr_ensemble.export import fusion_fit  # noqa: E402
from ctr_ensemble.models.predict import predict  # noqa: E402
from ctr_ensemble.training.member import train_member  # noqa: E402

ROWS = ("fitted", "negation_entropy τ=1", "mean")


def two_best(quality_runs: Path, dataset: str) -> list[str]:
    """The two members with the highest mean validation AUC of ours on ``dataset``."""
    vals: dict[str, list[float]] = {}
    for r in csv.DictReader(open(quality_runs)):
        if r["dataset"] == dataset and r["framework"] == "ours" and not r["error"]:
            vals.setdefault(r["member"], []).append(float(r["val_auc"]))
    if len(vals) < 2:
        raise SystemExit(f"{quality_runs}: fewer than two members of ours on {dataset}; run make bench-quality first")
    return sorted(vals, key=lambda m: -statistics.fmean(vals[m]))[:2]


def run_seed(names: list[str], spec, arrays: dict, seed: int, cfg: bq.BenchConfig) -> list[dict]:
    """Train both members with one seed; the test scores of each member and each fusion."""
    probs = {}
    for m in names:
        ck = train_member(f"{m}_s{seed}", m, bq.model_config(m, cfg), spec, arrays["train"], arrays["val"],
                          bq.train_config(cfg, seed))
        model = models.build(m, ck.config, spec)
        model.load_state_dict(ck.state_dict)
        probs[m] = {s: predict(model, arrays[s].feeds()) for s in ("val", "test")}
    stack = {s: np.stack([probs[m][s] for m in names], axis=1).astype(np.float32) for s in ("val", "test")}
    y = {s: arrays[s].label.astype(np.int64) for s in ("val", "test")}
    rule, record = fusion_fit.fit(names, stack["val"], y["val"])
    rules = {"fitted": rule, **fusion_fit.BASELINES}
    out = []
    for label, r in rules.items():
        p = fusion_fit.fused(r, stack["test"])
        out.append({"seed": seed, "row": label, "rule": r.describe(), "chosen": record["chosen"] if label == "fitted"
                    else "", "test_auc": metrics.auc(y["test"], p), "test_logloss": metrics.logloss(y["test"], p),
                    "test_calibration": metrics.calibration(y["test"], p)})
    for k, m in enumerate(names):
        p = stack["test"][:, k]
        out.append({"seed": seed, "row": m, "rule": "member", "chosen": "", "test_auc": metrics.auc(y["test"], p),
                    "test_logloss": metrics.logloss(y["test"], p), "test_calibration": metrics.calibration(y["test"], p)})
    return out


def summarise(runs: list[dict], names: list[str]) -> tuple[list[dict], dict]:
    rows = []
    for label in (*ROWS, *names):
        rs = [r for r in runs if r["row"] == label]
        auc_m, auc_s = bq.mean_std([r["test_auc"] for r in rs])
        ll_m, ll_s = bq.mean_std([r["test_logloss"] for r in rs])
        cal_m, _ = bq.mean_std([r["test_calibration"] for r in rs])
        rows.append({"row": label, "auc_mean": auc_m, "auc_std": auc_s, "logloss_mean": ll_m, "logloss_std": ll_s,
                     "calibration_mean": cal_m, "chosen": "; ".join(sorted({r["chosen"] for r in rs if r["chosen"]}))})
    members = [r for r in rows if r["row"] in names]
    best = max(members, key=lambda r: r["auc_mean"])
    fitted = rows[0]
    verdict = {"best_member": best["row"], "best_auc": best["auc_mean"], "best_std": best["auc_std"],
               "fitted_auc": fitted["auc_mean"], "gain": fitted["auc_mean"] - best["auc_mean"],
               "holds": fitted["auc_mean"] >= best["auc_mean"] - best["auc_std"],
               "beats_2std": fitted["auc_mean"] > best["auc_mean"] + 2 * best["auc_std"]}
    return rows, verdict


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(bq.DATASETS))
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--quality-runs", type=Path, default=Path("docs/bench/quality/quality_runs.csv"))
    p.add_argument("--out", type=Path, default=Path("artifacts/bench/ensemble"))
    p.add_argument("--docs", type=Path, default=None, help="also write the tables here")
    p.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    p.add_argument("--max-steps", type=int, default=0, help="optimiser steps per member (smoke runs)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cfg = bq.BenchConfig(datasets=a.datasets.split(","), seeds=[int(s) for s in a.seeds.split(",")],
                         data_root=a.data_root, out=a.out, fuxictr=False, max_steps=a.max_steps)
    all_runs, tables = [], []
    for ds in cfg.datasets:
        names = two_best(a.quality_runs, ds)
        bq.console.rule(f"{ds}: {' + '.join(names)}")
        prep = bq.prepare(ds, cfg)
        spec = fit(prep.dir / "train.parquet")
        arrays = {s: encode_file(prep.dir / f"{s}.parquet", spec) for s in ("train", "val", "test")}
        runs = []
        for seed in cfg.seeds:
            runs += [{"dataset": ds, **r} for r in run_seed(names, spec, arrays, seed, cfg)]
        rows, verdict = summarise(runs, names)
        all_runs += runs
        tables.append((ds, names, rows, verdict))
    env = bq.environment(cfg)
    md = ["# Fitted fusion vs τ = 1 vs mean vs the best member (`make bench-ensemble`)", "",
          f"- commit {env['commit']}, {env['date']}; machine: {env['cpu']}, "
          f"{env['cores']} cores, 1 torch thread; {(time.perf_counter() - t0) / 60:.1f} min",
          f"- per dataset the two members of ours with the highest mean validation AUC in {a.quality_runs}; product "
          f"defaults; seeds {a.seeds}; fusions fitted / chosen on the validation split, scored on the test split; "
          "mean ± sample std over seeds", ""]
    summary = []
    for ds, names, rows, v in tables:
        md += [f"## {ds}: {' + '.join(names)}", "", "| fusion | test AUC | test logloss | calibration | fit chose |",
               "|---|---|---|---|---|"]
        for r in rows:
            md.append(f"| {r['row']} | {bq._pm(r['auc_mean'], r['auc_std'])} | {bq._pm(r['logloss_mean'], r['logloss_std'])} "
                      f"| {bq._num(r['calibration_mean'], 3)} | {r['chosen'] or ''} |")
        md += ["", f"Fitted {v['fitted_auc']:.4f} vs best member {v['best_member']} {v['best_auc']:.4f} ± "
                   f"{v['best_std']:.4f}: {v['gain']:+.4f}; ≥ best − 1 std: {'✓' if v['holds'] else '✗'}; "
                   f"> best + 2 std: {'✓' if v['beats_2std'] else '✗'}", ""]
        summary.append({"dataset": ds, "members": "+".join(names), **v})
    n2 = sum(s["beats_2std"] for s in summary)
    md += ["## The bar", "", f"- fitted ≥ best member − 1 std on {sum(s['holds'] for s in summary)}/{len(summary)} "
           f"datasets; beats the best member by > 2 std on {n2}/{len(summary)} (needed: at least half)"]
    text = "\n".join(md) + "\n"
    write_report([a.out, a.docs], {"ensemble.md": text}, {"ensemble.csv": summary, "ensemble_runs.csv": all_runs})
    bq.console.print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
