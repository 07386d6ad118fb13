"""Quality, measured side by side: every member × dataset × seed, with FuxiCTR as the reference column.

For each dataset the splits are prepared once as ``<out>/quality/data/<dataset>/{train,val,test}.parquet``
(read with the project's own readers, written back with label, numeric, categorical and sequence
columns): these exact files are what our members train on and what FuxiCTR trains on, so both
see the same rows in the same order.

* ``synth``: the synthetic default (``ctr_ensemble.data.synth``), capped rows (``--synth-rows``);
  the true p is known, so the oracle AUC of the test split is reported too.
* ``criteo``: ``criteo_kaggle_sample`` train / dev / test as shipped (7,200 / 409 / 391 rows).
* ``avazu``: ``avazu_kaggle_sample`` train / dev / test as shipped (8,087 / 479 / 432 rows).
* ``movielens``: ``build_movielens`` on ``ml-latest-small`` (time split 80/10/10); the training
  split is optionally cut to its most recent ``--movielens-train-rows`` rows (val/test untouched).
* ``tinysynth``: a seconds-long synthetic smoke set (tests, ``--datasets tinysynth``).

Ours: ``data.fit.fit`` on train → ``encode_file`` → ``train_member`` (Adam, BCE, early stopping on
val AUC, best epoch restored) → ``predict`` on test → ``metrics``. FuxiCTR (``.venv-fuxictr``,
``benchmarks/fuxictr_runner.py``, a subprocess) trains its DeepFM/DCN/DCNv2/PNN/FiBiNET with each
member's own sizes and the same epochs / batch / lr / L2 / early stopping / min_count / seeds.

Samples/s = train rows × epochs run / wall seconds of the training call (both include the
per-epoch validation pass), with ``--threads`` torch threads on both sides.

Writes ``<out>/quality.csv`` (one row per dataset × member, ours and FuxiCTR side by side),
``<out>/quality_runs.csv`` (one row per run), ``<out>/quality.md`` and ``<out>/quality.png``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from rich.console import Console
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, stamp  # noqa: E402

from ctr_ensemble import metrics, models
from ctr_ensemble.data.encode import encode_file
from ctr_ensemble.data.fit import DEFAULT_MIN_COUNT, fit, resolve_min_count
from ctr_ensemble.data.movielens import build_movielens
from ctr_ensemble.data.readers import open_reader, read_all
from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.data.synth import DEFAULT_CARDINALITIES, SynthConfig, generate
from ctr_ensemble.errors import CtrError
from ctr_ensemble.models.predict import predict
from ctr_ensemble.training.config import TrainConfig
from ctr_ensemble.training.member import train_member

DATASETS = ("synth", "criteo", "avazu", "movielens")
EXTRA_DATASETS = ("tinysynth",)
FUXICTR_MEMBERS = {"deepfm": "DeepFM", "dcn": "DCN", "dcnv2": "DCNv2", "pnn": "PNN (IPNN)", "fibinet": "FiBiNET"}
# FuxiCTR numeric recipe per dataset under --fuxictr-numeric auto: the BARS Criteo recipe (log² buckets) for
# Criteo-style counts; sign·log1p + StandardScaler for MovieLens (a year is no count to bucket by log²).
AUTO_NUMERIC = {"synth": "bucket", "tinysynth": "bucket", "criteo": "bucket", "avazu": "bucket", "movielens": "scaled"}
WORSE_BEYOND = 1.0  # ours is "worse beyond seed noise" when ΔAUC < -1 pooled seed std
console = Console(width=None if sys.stdout.isatty() else 150)


# FuxiCTR's reference settings: the BARS recipe of its small public benchmarks (Frappe_x1 / MovielensLatest_x1,
# e.g. DeepFM_frappe_x1_001: embedding_dim 10, MLP [400, 400, 400] with batch norm and net_dropout 0.2,
# embedding_regularizer 0.05, net_regularizer 0, Adam lr 1e-3, batch 4096, up to 100 epochs, early_stop_patience 2,
# reduce_lr_on_plateau, min_categr_count 1). Two changes for these sizes, both recorded in the table: the batch is
# capped so an epoch has at least FUXICTR_MIN_STEPS steps (4096 would be 2 steps on the 7,200-row Criteo sample),
# and FiBiNET keeps our tower ([400]*3 over its 2·F(F−1)/2·D-wide bilinear output is ~8× the CPU cost).
FUXICTR_RECIPE = {"embedding_dim": 10, "hidden": [400, 400, 400], "batch_norm": True, "dropout": 0.2,
                  "embedding_regularizer": 0.05, "net_regularizer": 0.0, "lr": 1e-3, "batch_size": 4096,
                  "epochs": 100, "early_stop_patience": 2, "reduce_lr_on_plateau": True, "min_count": 1}
FUXICTR_MIN_STEPS = 16
FUXICTR_KEEP_OUR_TOWER = ("fibinet",)


def ours_recipe() -> dict:
    """``--fuxictr-recipe ours``: FuxiCTR trained with our defaults (None = each member's own config value), to
    tell the frameworks apart at equal settings."""
    d = TrainConfig()
    return {"embedding_dim": None, "hidden": None, "batch_norm": None, "dropout": None, "embedding_regularizer": None,
            "net_regularizer": None, "lr": d.lr, "batch_size": d.batch_size, "epochs": d.epochs,
            "early_stop_patience": d.patience, "reduce_lr_on_plateau": d.plateau_factor < 1, "min_steps": 0,
            "min_count": resolve_min_count(DEFAULT_MIN_COUNT, 0), "name": "our defaults"}


RECIPES = {"bars": lambda: {**FUXICTR_RECIPE, "min_steps": FUXICTR_MIN_STEPS, "name": "its BARS recipe"},
           "ours": ours_recipe}


@dataclass
class BenchConfig:
    members: list[str] = field(default_factory=lambda: list(models.REGISTRY))
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    # Ours runs with the product's defaults (TrainConfig(), each member's default config, data.fit's
    # min_count); these override them, for the measurements that chose the defaults.
    model_set: dict = field(default_factory=dict)
    train_set: dict = field(default_factory=dict)
    min_count: int | None = None  # None: data.fit's default
    fuxictr_recipe: dict = field(default_factory=lambda: RECIPES["bars"]())
    threads: int = 1
    synth_rows: int = 20_000  # train rows; val and test get a quarter each
    movielens_train_rows: int = 20_000  # 0 = the whole training split
    max_steps: int = 0  # per run; 0 = no limit (smoke runs)
    fuxictr: bool = True
    fuxictr_numeric: str = "auto"  # auto: FuxiCTR's Criteo log² buckets for count-like numerics, else scaled
    fuxictr_python: Path = Path(".venv-fuxictr/bin/python")
    data_root: Path = Path("../shared/data")
    out: Path = Path("artifacts/bench")
    docs: Path | None = None  # also write quality.{md,csv,png} and quality_runs.csv here (make bench-quality: docs/bench/quality)


@dataclass
class Prepared:
    """One dataset's split files (Parquet, identical for both frameworks) and what is known about them."""

    name: str
    dir: Path
    rows: dict[str, int]
    fields: dict
    note: str
    oracle_auc: float | None = None


# ----------------------------------------------------------------------------------------------- data


def export_parquet(src: Path, dst: Path, fmt: str = "auto", keep_last: int = 0) -> tuple[int, dict]:
    """Read ``src`` with the project's reader and write it to ``dst`` as Parquet.

    Columns: ``label`` (int64), the numeric fields (float64, null where missing), the categorical
    fields (string, "" where missing) and the sequence field (list<string>) if any, in the reader's
    order, so the ParquetReader gives back the same fields. ``keep_last`` > 0 keeps only the last
    rows (the most recent ones for a time-ordered file). Returns (rows, field names).
    """
    reader = open_reader(src, fmt)
    batch, _ = read_all(src, fmt)
    n = len(batch.label)
    start = max(0, n - keep_last) if keep_last > 0 else 0
    cols: dict[str, pa.Array] = {"label": pa.array(batch.label[start:].astype(np.int64))}
    for j, name in enumerate(reader.num_names):
        cols[name] = pa.array(batch.num[start:, j].astype(np.float64), from_pandas=True)  # NaN → null
    for name, col in zip(reader.cat_names, batch.cat):
        cols[name] = col.slice(start)
    if batch.seq is not None:
        cols[reader.seq_name] = batch.seq.slice(start)
    dst.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), dst)
    names = {"categorical": list(reader.cat_names), "numeric": list(reader.num_names), "sequence": reader.seq_name}
    return n - start, names


def _export_splits(name: str, files: dict[str, Path], out: Path, note: str, fmt: str = "auto",
                   keep_last: dict[str, int] | None = None, oracle_auc: float | None = None) -> Prepared:
    rows, fields = {}, {}
    for split, src in files.items():
        rows[split], fields = export_parquet(src, out / f"{split}.parquet", fmt, (keep_last or {}).get(split, 0))
    return Prepared(name, out, rows, fields, note, oracle_auc)


def _shipped(name: str, folder: str, cfg: BenchConfig, out: Path) -> Prepared:
    src = cfg.data_root / folder
    if not src.is_dir():
        raise CtrError(f"{src}: dataset folder not found (the benchmark reads ../shared/data; pass --data-root)")
    files = {"train": src / "train.csv", "val": src / "dev.csv", "test": src / "test.csv"}
    return _export_splits(name, files, out, f"{folder}: train/dev/test as shipped")


def prepare_synth(cfg: BenchConfig, out: Path, tiny: bool = False) -> Prepared:
    n = 3000 if tiny else cfg.synth_rows
    synth = SynthConfig(splits={"train": n, "val": n // 4, "test": n // 4})
    if tiny:
        synth = dataclasses.replace(synth, cardinalities=tuple(min(c, 200) for c in DEFAULT_CARDINALITIES))
    meta = generate(out / "raw", synth)
    files = {s: out / "raw" / f"{s}.tsv" for s in ("train", "val", "test")}
    return _export_splits("tinysynth" if tiny else "synth", files, out,
                          f"synthetic default (seed {synth.seed}), {n:,}/{n // 4:,}/{n // 4:,} rows", "criteo",
                          oracle_auc=meta["splits"]["test"]["oracle_auc"])


def prepare_movielens(cfg: BenchConfig, out: Path) -> Prepared:
    src = cfg.data_root / "ml-latest-small"
    if not src.is_dir():
        raise CtrError(f"{src}: dataset folder not found (the benchmark reads ../shared/data; pass --data-root)")
    meta = build_movielens(src / "ratings.csv", src / "movies.csv", out / "raw")
    files = {s: out / "raw" / f"{s}.parquet" for s in ("train", "val", "test")}
    cap = cfg.movielens_train_rows
    note = f"ml-latest-small, time split {meta['splits']['train']['rows']:,}/{meta['splits']['val']['rows']:,}/" \
           f"{meta['splits']['test']['rows']:,}"
    if cap and cap < meta["splits"]["train"]["rows"]:
        note += f", train cut to its most recent {cap:,} rows"
    return _export_splits("movielens", files, out, note, "parquet", keep_last={"train": cap})


def prepare(name: str, cfg: BenchConfig) -> Prepared:
    out = cfg.out / "quality" / "data" / name
    if name == "synth":
        return prepare_synth(cfg, out)
    if name == "tinysynth":
        return prepare_synth(cfg, out, tiny=True)
    if name == "criteo":
        return _shipped(name, "criteo_kaggle_sample", cfg, out)
    if name == "avazu":
        return _shipped(name, "avazu_kaggle_sample", cfg, out)
    if name == "movielens":
        return prepare_movielens(cfg, out)
    raise CtrError(f"unknown dataset {name!r}; available: {', '.join(DATASETS + EXTRA_DATASETS)}")


# ------------------------------------------------------------------------------------------- training


def train_config(cfg: BenchConfig, seed: int) -> TrainConfig:
    """Ours: the product's TrainConfig defaults, with ``--train-set`` overrides and the seed."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(cfg.train_set) - names
    if unknown:
        raise CtrError(f"--train-set: unknown TrainConfig keys {sorted(unknown)}; valid: {sorted(names)}")
    return TrainConfig(**{**cfg.train_set, "seed": seed, "max_steps": cfg.max_steps})


def model_config(member: str, cfg: BenchConfig):
    """Ours: the member's default config with the ``--model-set`` overrides it has (others are skipped)."""
    fields = {f.name for f in dataclasses.fields(models.entry(member).config)}
    return models.make_config(member, {k: v for k, v in cfg.model_set.items() if k in fields})


def fuxictr_request(member: str, seed: int, cfg: BenchConfig, train_rows: int) -> dict:
    """The runner's request for FuxiCTR's model of ``member``: the recipe's sizes, tower and regularizers (a None
    value, and structural settings such as cross layers, from our member config) and training settings."""
    r = cfg.fuxictr_recipe
    ours = dataclasses.asdict(models.make_config(member))

    def pick(key, our_key=None):
        return ours[our_key or key] if r[key] is None else r[key]

    model = {**ours, "embedding_dim": pick("embedding_dim"), "batch_norm": pick("batch_norm"),
             "dropout": pick("dropout")}
    if member not in FUXICTR_KEEP_OUR_TOWER:
        model["hidden"] = list(pick("hidden"))
    batch = fuxictr_batch(r["batch_size"], train_rows, r["min_steps"])
    train = {"lr": r["lr"], "batch_size": batch, "epochs": r["epochs"], "early_stop_patience": r["early_stop_patience"],
             "reduce_lr_on_plateau": r["reduce_lr_on_plateau"], "embedding_regularizer": pick("embedding_regularizer"),
             "net_regularizer": pick("net_regularizer")}
    if cfg.max_steps:  # smoke runs: a couple of epochs
        train["epochs"] = 2
    return {"member": member, "seed": seed, "config": model, "train": train}


def fuxictr_batch(batch: int, train_rows: int, min_steps: int = FUXICTR_MIN_STEPS) -> int:
    """The recipe's batch, halved until an epoch has at least ``min_steps`` steps (and at least 32 rows)."""
    while batch > 32 and train_rows / batch < min_steps:
        batch //= 2
    return batch


def warm_up(spec: FeatureSpec, arrays: dict, cfg: BenchConfig) -> None:
    """Two untimed steps of every member first: the first training in a process pays seconds of one-time setup."""
    small = arrays["val"].take(slice(0, 256))
    for m in cfg.members:
        train_member(f"warm-up {m}", m, model_config(m, cfg), spec, arrays["train"], small,
                     dataclasses.replace(train_config(cfg, 0), epochs=1, max_steps=2))


def run_ours(prep: Prepared, spec: FeatureSpec, arrays: dict, member: str, seed: int,
             cfg: BenchConfig) -> dict:
    """Train one member with one seed through the project's API; score the test split."""
    rec = {"dataset": prep.name, "member": member, "framework": "ours", "seed": seed, "error": None}
    try:
        model_cfg = model_config(member, cfg)
        tcfg = train_config(cfg, seed)
        t0 = time.perf_counter()
        ck = train_member(f"{member}_s{seed}", member, model_cfg, spec, arrays["train"], arrays["val"], tcfg)
        fit_seconds = time.perf_counter() - t0
        model = models.build(member, model_cfg, spec)
        model.load_state_dict(ck.state_dict)
        test = arrays["test"]
        p = predict(model, test.feeds())
        epochs = len(ck.metrics["history"])
        rows = len(arrays["train"])
        if cfg.max_steps:
            rows = min(rows, cfg.max_steps * tcfg.batch_size)
        rec.update(test_auc=metrics.auc(test.label, p), test_logloss=metrics.logloss(test.label, p),
                   **ads_metrics(test.label, p, float(arrays["train"].label.mean())),
                   val_auc=ck.metrics["val_auc"], epochs=epochs, train_rows=len(arrays["train"]),
                   fit_seconds=fit_seconds, samples_per_s=rows * epochs / fit_seconds)
    except (CtrError, RuntimeError, ValueError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
    return rec


def ads_metrics(y: np.ndarray, p: np.ndarray, train_rate: float) -> dict:
    """NE (against the training base rate), calibration (mean p / observed CTR) and ECE of one run's test scores."""
    return {"test_ne": metrics.normalized_entropy(y, p, train_rate), "test_calibration": metrics.calibration(y, p),
            "test_ece": metrics.expected_calibration_error(y, p)}


def fuxictr_numeric(dataset: str, cfg: BenchConfig) -> str:
    return AUTO_NUMERIC.get(dataset, "scaled") if cfg.fuxictr_numeric == "auto" else cfg.fuxictr_numeric


def fuxictr_job(prep: Prepared, cfg: BenchConfig, seq_max_len: int) -> dict:
    """The runner's job; ``seq_max_len`` 0 = leave the sequence column out (as our spec does then)."""
    return {
        "dataset": prep.name,
        "data_dir": str(prep.dir.resolve()),
        "work_dir": str((cfg.out / "quality" / "fuxictr" / prep.name).resolve()),
        "fields": prep.fields,
        "use_sequence": seq_max_len > 0,
        "seq_max_len": seq_max_len,
        "numeric": fuxictr_numeric(prep.name, cfg),
        "min_count": cfg.fuxictr_recipe["min_count"],
        "threads": cfg.threads,
    }


class FuxiCTRWorker:
    """The FuxiCTR runner for one dataset, kept running so that its runs can alternate with ours.

    ``start`` builds the dataset in the runner (FuxiCTR's preprocessing); ``run`` trains one (member, seed).
    Every failure becomes a result with ``error`` saying why (missing venv, dataset build, a run, a crash),
    so the table names it instead of dropping the column.
    """

    def __init__(self, prep: Prepared, cfg: BenchConfig, seq_max_len: int):
        self.prep, self.cfg, self.seq_max_len = prep, cfg, seq_max_len
        self.proc: subprocess.Popen | None = None
        self.failure: str | None = None
        self.work = cfg.out / "quality" / "fuxictr" / prep.name
        self.log_path = self.work / "runner.log"

    def start(self) -> None:
        if not self.cfg.fuxictr_python.exists():
            self.failure = f"{self.cfg.fuxictr_python} not found (make bench-quality creates .venv-fuxictr)"
            return
        if self.work.exists():  # FuxiCTR skips rebuilding when feature_map.json exists: start clean
            import shutil

            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        job_path = self.work / "job.json"
        job_path.write_text(json.dumps(fuxictr_job(self.prep, self.cfg, self.seq_max_len), indent=2))
        env = dict(os.environ, OMP_NUM_THREADS=str(self.cfg.threads), PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([str(self.cfg.fuxictr_python), str(Path(__file__).with_name("fuxictr_runner.py")),
                                      str(job_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env=env)
        line = self._read_tagged()
        if line is None:
            self._crashed()
        elif line[0] == "FAILED":
            self.failure = one_line(json.loads(line[1])["error"])
            self.close()

    def _read_tagged(self) -> tuple[str, str] | None:
        """The next READY/FAILED/RESULT line of the runner (other output is ignored); None at EOF."""
        for line in self.proc.stdout:
            tag, _, rest = line.rstrip("\n").partition(" ")
            if tag in ("READY", "FAILED", "RESULT"):
                return tag, rest
        return None

    def _crashed(self) -> None:
        rc = self.proc.wait()
        self.failure = one_line(f"runner exited {rc} (see {self.log_path}: {_last_line(self.log_path)})")
        self.proc = None

    def run(self, member: str, seed: int) -> dict:
        rec = {"dataset": self.prep.name, "member": member, "framework": "fuxictr", "seed": seed}
        if self.proc is None:
            return {**rec, "error": self.failure or "runner not started"}
        req = fuxictr_request(member, seed, self.cfg, self.prep.rows["train"])
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._crashed()
            return {**rec, "error": self.failure}
        line = self._read_tagged()
        if line is None:
            self._crashed()
            return {**rec, "error": self.failure}
        r = json.loads(line[1])
        if r.get("error"):
            r["error"] = one_line(r["error"])
        return {**rec, **r}

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait()
            self.proc = None
        if getattr(self, "_log", None):
            self._log.close()


def one_line(msg: str, limit: int = 240) -> str:
    """An error message fit for a table cell: one line, at most ``limit`` characters."""
    msg = " ".join(msg.split()).replace("|", "/")
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def _last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "no output"


def _note(bar, r: dict) -> None:
    if r.get("error"):
        bar.write(f"  {r['framework']:8s} {r['dataset']:10s} {r['member']:12s} seed {r['seed']}: FAILED {r['error']}")
    else:
        bar.write(f"  {r['framework']:8s} {r['dataset']:10s} {r['member']:12s} seed {r['seed']}: test AUC "
                  f"{r['test_auc']:.4f} logloss {r['test_logloss']:.4f} ({r['epochs']} ep, "
                  f"{r['samples_per_s']:,.0f} samples/s)")


# ---------------------------------------------------------------------------------------- aggregation


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value); (None, None) for none."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def in_std(diff: float | None, s1: float | None, s2: float | None) -> float | None:
    """A difference in units of the pooled seed std sqrt((s1² + s2²) / 2); None when undefined."""
    if diff is None or s1 is None or s2 is None:
        return None
    pooled = math.sqrt((s1 * s1 + s2 * s2) / 2)
    if pooled == 0:
        return None if diff == 0 else math.copysign(math.inf, diff)
    return diff / pooled


def summarise(runs: list[dict], framework: str) -> dict:
    ok = [r for r in runs if r["framework"] == framework and not r.get("error")]
    errors = sorted({r["error"] for r in runs if r["framework"] == framework and r.get("error")})
    auc_m, auc_s = mean_std([r["test_auc"] for r in ok])
    ll_m, ll_s = mean_std([r["test_logloss"] for r in ok])
    ne_m, ne_s = mean_std([r.get("test_ne") for r in ok])
    cal_m, _ = mean_std([r.get("test_calibration") for r in ok])
    sps_m, _ = mean_std([r["samples_per_s"] for r in ok])
    ep_m, _ = mean_std([r["epochs"] for r in ok])
    return {"runs": len(ok), "auc_mean": auc_m, "auc_std": auc_s, "logloss_mean": ll_m, "logloss_std": ll_s,
            "ne_mean": ne_m, "ne_std": ne_s, "calibration_mean": cal_m,
            "samples_per_s": sps_m, "epochs": ep_m, "error": "; ".join(errors)}


def aggregate(runs: list[dict], fuxictr_requested: bool = True) -> list[dict]:
    """One row per (dataset, member): ours and FuxiCTR mean ± std over seeds and their differences."""
    keys = list(dict.fromkeys((r["dataset"], r["member"]) for r in runs))
    rows = []
    for ds, m in keys:
        group = [r for r in runs if r["dataset"] == ds and r["member"] == m]
        ours, fx = summarise(group, "ours"), summarise(group, "fuxictr")
        row = {"dataset": ds, "member": m}
        row.update({f"ours_{k}": v for k, v in ours.items()})
        row.update({f"fuxictr_{k}": v for k, v in fx.items()})
        if m not in FUXICTR_MEMBERS:
            row["fuxictr_error"] = "no FuxiCTR model"
        elif not fuxictr_requested:
            row["fuxictr_error"] = "not run (--no-fuxictr)"
        both = ours["runs"] and fx["runs"]
        seeds_each = min(ours["runs"], fx["runs"]) >= 2  # a seed std needs two seeds on both sides
        row["auc_diff"] = ours["auc_mean"] - fx["auc_mean"] if both else None
        row["auc_diff_in_std"] = in_std(row["auc_diff"], ours["auc_std"], fx["auc_std"]) if seeds_each else None
        row["logloss_diff"] = ours["logloss_mean"] - fx["logloss_mean"] if both else None
        row["logloss_diff_in_std"] = (in_std(row["logloss_diff"], ours["logloss_std"], fx["logloss_std"])
                                      if seeds_each else None)
        row["speed_ratio"] = ours["samples_per_s"] / fx["samples_per_s"] if both else None
        # The bar: ours' mean ≥ FuxiCTR's mean − FuxiCTR's seed std (None when not compared).
        row["goal"] = (ours["auc_mean"] >= fx["auc_mean"] - (fx["auc_std"] or 0.0)) if both else None
        rows.append(row)
    return rows


# -------------------------------------------------------------------------------------------- reports

CSV_COLUMNS = ["dataset", "member",
               "ours_runs", "ours_auc_mean", "ours_auc_std", "ours_logloss_mean", "ours_logloss_std",
               "ours_ne_mean", "ours_ne_std", "ours_calibration_mean",
               "ours_samples_per_s", "ours_epochs", "ours_error",
               "fuxictr_runs", "fuxictr_auc_mean", "fuxictr_auc_std", "fuxictr_logloss_mean", "fuxictr_logloss_std",
               "fuxictr_ne_mean", "fuxictr_ne_std", "fuxictr_calibration_mean",
               "fuxictr_samples_per_s", "fuxictr_epochs", "fuxictr_error",
               "auc_diff", "auc_diff_in_std", "goal", "logloss_diff", "logloss_diff_in_std", "speed_ratio"]
RUN_COLUMNS = ["dataset", "member", "framework", "seed", "test_auc", "test_logloss", "test_ne", "test_calibration",
               "test_ece", "val_auc", "epochs", "train_rows",
               "fit_seconds", "samples_per_s", "error"]


def write_csv(rows: list[dict], path: Path, columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _pm(m, s, digits=4) -> str:
    return "–" if m is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def _num(x, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def dataset_verdict(ds_rows: list[dict]) -> str:
    """The issue's bar on one dataset: every compared member ≥ FuxiCTR's same model − 1 std, and the mean over
    the compared members ≥ FuxiCTR's mean."""
    both = [r for r in ds_rows if r["goal"] is not None]
    if not both:
        return "No member compared with FuxiCTR here."
    ours = statistics.fmean(r["ours_auc_mean"] for r in both)
    fx = statistics.fmean(r["fuxictr_auc_mean"] for r in both)
    failed = [r["member"] for r in both if not r["goal"]]
    return (f"Mean test AUC over the {len(both)} compared members: ours {ours:.4f}, FuxiCTR {fx:.4f} "
            f"({'✓' if ours >= fx else '✗'} mean); members ≥ FuxiCTR − 1 std: {len(both) - len(failed)}/{len(both)}"
            + (f" (✗ {', '.join(failed)})" if failed else " ✓"))


def _sigma(x) -> str:
    return "–" if x is None else f"{x:+.1f}σ"


def render_md(rows: list[dict], preps: dict[str, Prepared], cfg: BenchConfig, env: dict, seconds: float) -> str:
    out = ["# Quality benchmark: members × datasets, ours vs FuxiCTR", ""]
    d_tr, r = TrainConfig(), cfg.fuxictr_recipe
    over = (f" with overrides model {cfg.model_set} train {cfg.train_set}" if cfg.model_set or cfg.train_set else "")
    out += [f"- commit {env['commit']}, {env['date']}; machine: {env['cpu']}, {env['cores']} cores, {cfg.threads} "
            f"torch thread(s) per run on both sides; Python {env['python']}, torch {env['torch']}, "
            f"FuxiCTR {env.get('fuxictr', 'not run')}",
            f"- seeds {','.join(map(str, cfg.seeds))}; test split scored; mean ± sample std over seeds",
            f"- **ours: the product's defaults**{over}: each member's default config (`ctr-ensemble models --json`), "
            f"Adam lr {d_tr.lr:g}, batch {d_tr.batch_size}, up to {d_tr.epochs} epochs, early stop after "
            f"{d_tr.patience} epochs without a better val AUC (best epoch restored), lr × {d_tr.plateau_factor:g} "
            f"on each such epoch; vocabulary min_count "
            f"{cfg.min_count if cfg.min_count is not None else DEFAULT_MIN_COUNT}",
            (f"- **FuxiCTR: its BARS recipe** (DeepFM_frappe_x1): embedding_dim {r['embedding_dim']}, MLP {r['hidden']} "
             f"(FiBiNET: our tower), batch_norm {r['batch_norm']}, net_dropout {r['dropout']}, embedding_regularizer "
             f"{r['embedding_regularizer']:g}, net_regularizer {r['net_regularizer']:g}, Adam lr {r['lr']:g}, batch "
             f"{r['batch_size']} capped at ≥ {r['min_steps']} steps per epoch, up to {r['epochs']} epochs, "
             f"early_stop_patience {r['early_stop_patience']}, reduce_lr_on_plateau {r['reduce_lr_on_plateau']}, "
             f"min_categr_count {r['min_count']}" if r["name"] != "our defaults" else
             f"- **FuxiCTR: with our defaults** (each member's sizes, tower and regularizers; Adam lr {r['lr']:g}, "
             f"batch {r['batch_size']}, up to {r['epochs']} epochs, early_stop_patience {r['early_stop_patience']}, "
             f"reduce_lr_on_plateau {r['reduce_lr_on_plateau']}, min_categr_count {r['min_count']}): the frameworks "
             f"at equal settings"),
            f"- NE = test logloss / entropy of the training base rate; calibration = mean predicted / observed CTR",
            f"- Δ = ours − FuxiCTR, also in units of the pooled seed std σ = √((σ_ours² + σ_fx²)/2); "
            f"✗ marks ΔAUC < −{WORSE_BEYOND:g}σ (ours worse beyond seed noise); speed = ours ÷ FuxiCTR samples/s",
            f"- total wall time {seconds / 60:.1f} min", ""]
    for ds, prep in preps.items():
        out.append(f"## {ds}")
        out.append("")
        info = f"{prep.note}; rows train/val/test {prep.rows['train']:,}/{prep.rows['val']:,}/{prep.rows['test']:,}; " \
               f"{len(prep.fields['categorical'])} categorical, {len(prep.fields['numeric'])} numeric fields"
        if prep.fields.get("sequence"):
            info += f", sequence `{prep.fields['sequence']}` ({env['sequence_use'].get(ds, '')})"
        if prep.oracle_auc is not None:
            info += f"; oracle AUC of the test split {prep.oracle_auc:.4f}"
        if cfg.fuxictr and prep.fields["numeric"]:
            recipe = fuxictr_numeric(ds, cfg)
            info += "; FuxiCTR numerics: " + ("log² buckets as categorical ids (its Criteo recipe)" if recipe == "bucket"
                                             else "sign·log1p + StandardScaler, value × vector")
        out += [info, ""]
        out.append("| member | AUC ours | AUC FuxiCTR | ΔAUC | goal | logloss ours | logloss FuxiCTR | NE ours | "
                   "NE FuxiCTR | calib. ours | calib. FuxiCTR | epochs ours / FuxiCTR | samples/s ours | "
                   "samples/s FuxiCTR | speed |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        ds_rows = [r for r in rows if r["dataset"] == ds]
        for r in ds_rows:
            fx_auc = _pm(r["fuxictr_auc_mean"], r["fuxictr_auc_std"]) if r["fuxictr_runs"] else r["fuxictr_error"] or "–"
            ours_auc = _pm(r["ours_auc_mean"], r["ours_auc_std"]) if r["ours_runs"] else f"failed: {r['ours_error']}"
            mark = " ✗" if r["auc_diff_in_std"] is not None and r["auc_diff_in_std"] < -WORSE_BEYOND else ""
            d_auc = "–" if r["auc_diff"] is None else f"{r['auc_diff']:+.4f} ({_sigma(r['auc_diff_in_std'])}){mark}"
            goal = {True: "✓", False: "✗", None: "–"}[r["goal"]]
            sps_o = "–" if r["ours_samples_per_s"] is None else f"{r['ours_samples_per_s']:,.0f}"
            sps_f = "–" if r["fuxictr_samples_per_s"] is None else f"{r['fuxictr_samples_per_s']:,.0f}"
            speed = "–" if r["speed_ratio"] is None else f"{r['speed_ratio']:.2f}×"
            out.append(f"| {r['member']} | {ours_auc} | {fx_auc} | {d_auc} | {goal} "
                       f"| {_pm(r['ours_logloss_mean'], r['ours_logloss_std'])} "
                       f"| {_pm(r['fuxictr_logloss_mean'], r['fuxictr_logloss_std'])} "
                       f"| {_num(r['ours_ne_mean'])} | {_num(r['fuxictr_ne_mean'])} "
                       f"| {_num(r['ours_calibration_mean'], 3)} | {_num(r['fuxictr_calibration_mean'], 3)} "
                       f"| {_num(r['ours_epochs'], 1)} / {_num(r['fuxictr_epochs'], 1)} | {sps_o} | {sps_f} | {speed} |")
        out += ["", dataset_verdict(ds_rows), ""]
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    """AUC bars (mean, std error bars) per member, ours and FuxiCTR side by side, one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    ncol = min(2, len(datasets))
    nrow = math.ceil(len(datasets) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(7.5 * ncol, 3.8 * nrow), squeeze=False)
    for ax, ds in zip(axes.flat, datasets):
        rs = [r for r in rows if r["dataset"] == ds]
        x = np.arange(len(rs))
        w = 0.38
        vals = []
        for off, fw, color in ((-w / 2, "ours", "tab:blue"), (w / 2, "fuxictr", "tab:orange")):
            m = [r[f"{fw}_auc_mean"] if r[f"{fw}_auc_mean"] is not None else np.nan for r in rs]
            s = [r[f"{fw}_auc_std"] if r[f"{fw}_auc_std"] is not None else 0.0 for r in rs]
            ax.bar(x + off, m, w, yerr=s, capsize=3, color=color, label="ours" if fw == "ours" else "FuxiCTR 2.3")
            vals += [a - b for a, b in zip(m, s) if not np.isnan(a)] + [a + b for a, b in zip(m, s) if not np.isnan(a)]
        if vals:
            lo, hi = min(vals), max(vals)
            pad = max(0.01, (hi - lo) * 0.15)
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks(x, [r["member"] for r in rs], rotation=30, ha="right")
        ax.set_title(ds)
        ax.set_ylabel("test AUC (mean ± std over seeds)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    for ax in list(axes.flat)[len(datasets):]:
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment(cfg: BenchConfig) -> dict:
    env = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
           "sequence_use": {}, **stamp()}
    if cfg.fuxictr and cfg.fuxictr_python.exists():
        r = subprocess.run([str(cfg.fuxictr_python), "-c", "import importlib.metadata as m; print(m.version('fuxictr'))"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            env["fuxictr"] = r.stdout.strip()
    return env


# ----------------------------------------------------------------------------------------------- main


def run(cfg: BenchConfig) -> list[dict]:
    t_start = time.perf_counter()
    for m in cfg.members:
        models.entry(m)
    torch.set_num_threads(cfg.threads)
    env = environment(cfg)
    fx_members = [m for m in cfg.members if m in FUXICTR_MEMBERS] if cfg.fuxictr else []
    total = len(cfg.datasets) * len(cfg.seeds) * (len(cfg.members) + len(fx_members))
    runs: list[dict] = []
    preps: dict[str, Prepared] = {}
    bar = tqdm(total=total, desc="bench-quality runs", unit="run")
    for ds in cfg.datasets:
        console.rule(f"{ds}: preparing splits")
        prep = prepare(ds, cfg)
        preps[ds] = prep
        fit_args = {} if cfg.min_count is None else {"min_count": cfg.min_count}
        spec = fit(prep.dir / "train.parquet", **fit_args)
        arrays = {s: encode_file(prep.dir / f"{s}.parquet", spec) for s in ("train", "val", "test")}
        use_seq = spec.sequence is not None
        if prep.fields.get("sequence"):
            env["sequence_use"][ds] = (f"last {spec.sequence.max_len} items: our classic members add a mean-pooled "
                                       f"history token, InterFormer runs its sequence arch; FuxiCTR: a mean-pooled "
                                       f"sequence field (MaskedAveragePooling)" if use_seq else
                                       "ignored by our members (spec: ignored_sequence) and by FuxiCTR")
        console.print(f"{prep.note}; rows {prep.rows}; {len(spec.categorical)} categorical / {len(spec.numeric)} "
                      f"numeric fields; min_count {spec.min_count}")
        worker = None
        if fx_members:
            worker = FuxiCTRWorker(prep, cfg, spec.sequence.max_len if use_seq else 0)
            console.print(f"FuxiCTR: building {ds} with its own preprocessing ({worker.log_path})")
            worker.start()
            if worker.failure:
                console.print(f"[red]FuxiCTR unavailable for {ds}:[/] {worker.failure}")
        warm_up(spec, arrays, cfg)
        try:
            # Ours and FuxiCTR alternate run by run, so drifting load on a shared machine hits both alike.
            for m in cfg.members:
                for s in cfg.seeds:
                    for r in ([run_ours(prep, spec, arrays, m, s, cfg)]
                              + ([worker.run(m, s)] if worker and m in fx_members else [])):
                        runs.append(r)
                        bar.update(1)
                        _note(bar, r)
        finally:
            if worker:
                worker.close()
    bar.close()
    seconds = time.perf_counter() - t_start
    rows = aggregate(runs, cfg.fuxictr)
    write_csv(rows, cfg.out / "quality.csv", CSV_COLUMNS)
    write_csv(runs, cfg.out / "quality_runs.csv", RUN_COLUMNS)
    md = render_md(rows, preps, cfg, env, seconds)
    (cfg.out / "quality.md").write_text(md + "\n")
    plot(rows, cfg.out / "quality.png")
    if cfg.docs is not None:
        import shutil

        cfg.docs.mkdir(parents=True, exist_ok=True)
        for name in ("quality.csv", "quality_runs.csv", "quality.md", "quality.png"):
            shutil.copy(cfg.out / name, cfg.docs / name)
    console.print(md)
    console.print(f"wrote {cfg.out / 'quality.csv'}, {cfg.out / 'quality_runs.csv'}, {cfg.out / 'quality.md'}, "
                  f"{cfg.out / 'quality.png'} ({seconds / 60:.1f} min)")
    return rows


def _csv_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _sets(p: argparse.ArgumentParser, items: list[str]) -> dict:
    """KEY=VALUE items → {key: YAML-parsed value}."""
    import yaml

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            p.error(f"expected KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Full setting: --full (all rows) or set --synth-rows/--movielens-train-rows.")
    p.add_argument("--members", type=_csv_list, default=d.members, help="comma list (default: the whole registry)")
    p.add_argument("--datasets", type=_csv_list, default=d.datasets, help=f"comma list of {', '.join(DATASETS)} (or tinysynth)")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in _csv_list(s)], default=d.seeds, help="comma list, default 1,2,3")
    p.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override ours' member config (every member that has the key; YAML value); repeatable")
    p.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override ours' TrainConfig (e.g. epochs=3, lr=1e-3); repeatable")
    p.add_argument("--min-count", type=int, default=None, help="ours' vocabulary min_count (default: the product's)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per run, both frameworks")
    p.add_argument("--synth-rows", type=int, default=d.synth_rows, help="synthetic train rows (val/test a quarter each)")
    p.add_argument("--movielens-train-rows", type=int, default=d.movielens_train_rows,
                   help="keep the most recent N MovieLens training rows (0 = all)")
    p.add_argument("--full", action="store_true", help="the full setting: 160k synthetic rows, all MovieLens rows")
    p.add_argument("--max-steps", type=int, default=0, help="optimiser steps per run of ours (smoke runs; 0 = no limit)")
    p.add_argument("--no-fuxictr", dest="fuxictr", action="store_false", help="skip the FuxiCTR reference column")
    p.add_argument("--fuxictr-numeric", choices=["auto", "bucket", "scaled"], default=d.fuxictr_numeric,
                   help="FuxiCTR numeric recipe: bucket (its Criteo log² buckets), scaled (sign·log1p + StandardScaler)")
    p.add_argument("--fuxictr-python", type=Path, default=d.fuxictr_python)
    p.add_argument("--fuxictr-recipe", choices=sorted(RECIPES), default="bars",
                   help="FuxiCTR's settings: bars (its BARS recipe, the reference) or ours (our defaults)")
    p.add_argument("--data-root", type=Path, default=d.data_root)
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--docs", type=Path, default=None, help="also copy the tables and the plot into this folder")
    a = p.parse_args(argv)
    cfg = BenchConfig(members=a.members, datasets=a.datasets, seeds=a.seeds, model_set=_sets(p, a.model_set),
                      train_set=_sets(p, a.train_set), min_count=a.min_count, threads=a.threads,
                      synth_rows=a.synth_rows, movielens_train_rows=a.movielens_train_rows, max_steps=a.max_steps,
                      fuxictr=a.fuxictr, fuxictr_numeric=a.fuxictr_numeric, fuxictr_python=a.fuxictr_python,
                      data_root=a.data_root, out=a.out, docs=a.docs, fuxictr_recipe=RECIPES[a.fuxictr_recipe]())
    if a.full:
        cfg.synth_rows, cfg.movielens_train_rows = 160_000, 0
    for ds in cfg.datasets:
        if ds not in DATASETS + EXTRA_DATASETS:
            p.error(f"unknown dataset {ds!r}; available: {', '.join(DATASETS + EXTRA_DATASETS)}")
    if not cfg.seeds:
        p.error("--seeds needs at least one seed")
    return cfg


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_args(argv))
    except CtrError as e:
        console.print(f"error: {e}", markup=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
