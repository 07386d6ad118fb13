"""``make bench-tune``: ``ctr-ensemble tune --model deepfm --trials 20`` on the MovieLens task, test AUC of the best
trial against the untuned defaults, for a few (objective, seed) variants.

The MovieLens task is ``ctr-ensemble data movielens`` on ``ml-latest-small`` (click = rating >= 4, the user's
earlier movies as the history, split by time 80/10/10), all training rows, its spec fitted by ``data fit``.
Each variant is one study in ``--work`` (a finished study is resumed, not rerun: its outputs are rewritten
from the stored trials and checkpoints). Writes ``tune.md`` and ``tune.csv`` (stamped with commit, date and
machine) and each variant's ``best.yaml``, ``trials.csv``, ``summary.json``, ``history.png`` and
``importance.png`` under ``<docs>/<variant>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cli, cpu_name, stamp, write_report  # noqa: E402

COPIED = ("best.yaml", "trials.csv", "summary.json", "history.png", "importance.png")


def movielens(data_root: Path, work: Path) -> Path:
    task = work / "movielens"
    if not (task / "spec.json").is_file():
        src = data_root / "ml-latest-small"
        cli("data", "movielens", "--ratings", str(src / "ratings.csv"), "--movies", str(src / "movies.csv"),
            "--out", str(task))
        cli("data", "fit", "--train", str(task / "train.parquet"), "--out", str(task / "spec.json"))
    return task


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=ROOT / "artifacts" / "tune")
    p.add_argument("--docs", type=Path, default=None, help="also write the report here (make bench-tune: docs/tune)")
    p.add_argument("--model", default="deepfm")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default="auc:42,auc:7,logloss:42",
                   help="comma list of SELECT:SEED (tune --select and --seed)")
    a = p.parse_args()
    t0 = time.perf_counter()
    task = movielens(a.data_root, a.work)
    rows = []
    for v in a.variants.split(","):
        select, seed = v.split(":")
        name = f"{a.model}-{select}-s{seed}"
        out = a.work / name
        cli("tune", "--model", a.model, "--train", str(task / "train.parquet"), "--val", str(task / "val.parquet"),
            "--test", str(task / "test.parquet"), "--spec", str(task / "spec.json"), "--out", str(out),
            "--trials", str(a.trials), "--threads", str(a.threads), "--select", select, "--seed", seed, "--refit")
        s = json.loads((out / "summary.json").read_text())
        best, test = s["best"], s["test"]
        rows.append({"variant": name, "select": select, "seed": int(seed), "complete": s["trials"]["complete"],
                     "pruned": s["trials"]["pruned"], "best_trial": best["trial"], "best_val_auc": best["val_auc"],
                     "best_val_logloss": best.get("val_logloss"), "default_val_auc": test["default"]["val_auc"],
                     "best_test_auc": test["best"]["test_auc"], "default_test_auc": test["default"]["test_auc"],
                     "best_test_logloss": test["best"]["test_logloss"],
                     "default_test_logloss": test["default"]["test_logloss"], "test_auc_gain": test["test_auc_gain"],
                     "refit_best_test_auc": test["refit"]["best"]["test_auc"], "refit_best_epochs": test["refit"]["best"]["epochs"],
                     "refit_default_test_auc": test["refit"]["default"]["test_auc"],
                     "refit_default_epochs": test["refit"]["default"]["epochs"],
                     "refit_test_auc_gain": test["refit"]["test_auc_gain"]})
        for folder in (a.work / "report", a.docs):
            if folder is not None:
                (folder / name).mkdir(parents=True, exist_ok=True)
                for f in COPIED:
                    shutil.copy(out / f, folder / name / f)
    st = stamp()
    md = [f"# `ctr-ensemble tune --model {a.model} --trials {a.trials}` on the MovieLens task (`make bench-tune`)", "",
          f"- commit {st['commit']}, {st['date']}; machine: {cpu_name()}, {os.cpu_count()} cores, {a.threads} torch "
          f"thread(s); {(time.perf_counter() - t0) / 60:.1f} min (finished studies are resumed, not rerun)",
          "- data: `ctr-ensemble data movielens` on ml-latest-small (time split 80/10/10, all training rows), "
          "`data fit` spec; each trial trains on train, early-stops and is scored on val; test is used only "
          "for this report",
          "- default = the registry's defaults with the same `--select` and `--seed` (trial 0 of every study)",
          "- refit (`tune --refit`): the best trial's config and the default config, each retrained on train + val "
          "for its own best epoch count (chosen on val), each epoch at the learning rate it had there, then tested; the protocol for a time split, where the "
          "validation period is the one nearest the test", "",
          "| variant | trials (complete / pruned) | val AUC best / default | test AUC best / default | Δ test AUC | "
          "test logloss best / default | refit: test AUC best / default (epochs) | refit: Δ test AUC |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| [{r['variant']}]({r['variant']}/summary.json) | {r['complete']} / {r['pruned']} | "
                  f"{r['best_val_auc']:.4f} / {r['default_val_auc']:.4f} | {r['best_test_auc']:.4f} / "
                  f"{r['default_test_auc']:.4f} | {r['test_auc_gain']:+.4f} | {r['best_test_logloss']:.4f} / "
                  f"{r['default_test_logloss']:.4f} | {r['refit_best_test_auc']:.4f} / {r['refit_default_test_auc']:.4f} "
                  f"({r['refit_best_epochs']} / {r['refit_default_epochs']}) | {r['refit_test_auc_gain']:+.4f} |")
    text = "\n".join(md) + "\n"
    write_report([a.work / "report", a.docs], {"tune.md": text}, {"tune.csv": rows})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
