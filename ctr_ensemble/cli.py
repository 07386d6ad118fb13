"""``ctr-ensemble``: every stage of the pipeline as one command (typer)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml

from ctr_ensemble.errors import CtrError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="From click logs to a served, measured Triton ensemble of CTR models.")
data_app = typer.Typer(no_args_is_help=True, help="Generate, inspect and encode data.")
app.add_typer(data_app, name="data")

STATE = {"debug": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    STATE["debug"] = debug


def _split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


RESUME_HELP = "Continue a killed run from its saved training state (same data, members and settings)."
SAVE_EVERY_HELP = "Optimiser steps between saved training states (0 = at the end of each epoch only)."
# Options every training command shares (train, train-mutual, train-collab): data, devices, torchrun.
TRAIN_DATA_HELP = "Training data: a raw file, or a folder from `data prepare`."
OPTIMIZER_HELP = "adam (dense) | sparse_adam | sparse_adagrad (sparse embedding updates; not on NCCL)."
AMP_HELP = "none | bf16: autocast the training forward to bfloat16 (for GPUs; slow on CPUs without bf16 units)."
COMPILE_HELP = "torch.compile the training forward (dense --optimizer adam only)."
EMB_LR_HELP = "Learning rate of the embedding tables with a sparse optimizer (0 = 5 x --lr)."
DEVICE_HELP = "auto | cpu | cuda."
STREAMS_HELP = "Row streams (0 = one per process); --streams N on one process reproduces an N-process run's batches."
PREFETCH_HELP = "Batches built ahead by a thread (>= 1 on CUDA)."
DIST_TIMEOUT_HELP = "Seconds a torchrun worker waits for the others before stopping with an error."
VERIFY_HELP = "Prepared data check at start: size (sizes + headers) | full (+ CRC-32 of every byte)."
MIN_COUNT_HELP = ("Tokens seen fewer times in train map to the OOV id 0 (which also takes unseen tokens): an integer, "
                  "or auto = 2 below 10 M training rows, 10 from there on.")
EPOCHS_HELP = "The most epochs; early stopping on val AUC normally ends training first."
WEIGHT_DECAY_HELP = ("Adam's coupled L2 on every parameter (0 = off; the members' embedding_regularizer / net_regularizer, "
                     "set with --set, are the usual regularizers).")
SELECT_HELP = ("Validation metric for model selection, early stopping and reduce-LR-on-plateau: auc (highest) "
               "or logloss (lowest).")
PATIENCE_HELP = "Epochs in a row without a better val AUC that stop training (the best epoch's weights are kept)."
PLATEAU_HELP = "Learning-rate factor after each epoch without a better val AUC (reduce-LR-on-plateau; 1 = off)."
REG_ROWS_HELP = ("Embedding regularizer over: all (every table row each step, FuxiCTR's semantics), batch (the rows the "
                 "batch looked up; for sparse optimizers and huge tables), auto (all with adam, batch with sparse ones).")
BATCH_HELP = "Global batch size (split over torchrun processes)."


def _arch_overrides(sets: list[str]) -> dict[str, dict]:
    """``ARCH.KEY=VALUE`` options → {arch: {key: value}} (values are YAML)."""
    out: dict[str, dict] = {}
    for k, v in _parse_sets(sets).items():
        if "." not in k:
            raise CtrError(f"--set expects ARCH.KEY=VALUE here (e.g. deepfm.hidden=[64]), got {k!r}")
        arch, key = k.split(".", 1)
        out.setdefault(arch, {})[key] = v
    return out


def _parse_sets(sets: list[str]) -> dict:
    out = {}
    for s in sets:
        if "=" not in s:
            raise CtrError(f"--set expects KEY=VALUE (YAML value), got {s!r}")
        k, v = s.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(Path("artifacts/data/synth"), help="Output folder for train/val/test TSV + p files."),
    train_rows: int = typer.Option(160_000, help="Rows in the train split."),
    val_rows: int = typer.Option(20_000, help="Rows in the validation split."),
    test_rows: int = typer.Option(20_000, help="Rows in the test split."),
    seed: int = typer.Option(7, help="Seed of the synthetic world and of the rows."),
    seq_max_len: int = typer.Option(0, help="> 0: add a behaviour sequence `history` whose most recent N items "
                                             "influence p, and write Parquet instead of TSV."),
) -> None:
    """Write a synthetic CTR data set in the Criteo TSV layout (Parquet with a sequence), with the true p per row."""
    from ctr_ensemble.data.synth import SynthConfig, generate

    meta = generate(out, SynthConfig(seed=seed, splits={"train": train_rows, "val": val_rows, "test": test_rows},
                                     seq_max_len=seq_max_len))
    for split, m in meta["splits"].items():
        typer.echo(f"{out / m['file']}: {m['rows']} rows, CTR {m['ctr']:.4f}, oracle AUC {m['oracle_auc']:.4f}")


@data_app.command("movielens")
def data_movielens(
    ratings: Path = typer.Option(..., help="MovieLens ratings.csv (userId,movieId,rating,timestamp)."),
    movies: Path = typer.Option(..., help="MovieLens movies.csv (movieId,title,genres)."),
    out: Path = typer.Option(Path("artifacts/data/movielens"), help="Output folder for train/val/test Parquet."),
    max_history: int = typer.Option(50, help="Keep the user's most recent N earlier movies as the history."),
    val_frac: float = typer.Option(0.1), test_frac: float = typer.Option(0.1),
) -> None:
    """Build a sequential CTR task from MovieLens: click = rating >= 4, history = earlier movies, split by time."""
    from ctr_ensemble.data.movielens import build_movielens

    meta = build_movielens(ratings, movies, out, max_history=max_history, val_frac=val_frac, test_frac=test_frac)
    typer.echo(json.dumps(meta, indent=2, default=str)[:2000])


@data_app.command("fit")
def data_fit(
    train: Path = typer.Option(..., help="Training file (Criteo TSV layout)."),
    out: Path = typer.Option(Path("artifacts/feature_spec.json"), help="Where to write the feature spec JSON."),
    min_count: str = typer.Option("auto", help=MIN_COUNT_HELP),
    skip_bad_rows: bool = typer.Option(False, help="Skip and count malformed rows instead of stopping."),
    fmt: str = typer.Option("auto", "--format", help="Data format: auto, criteo, avazu, libsvm, parquet."),
    seq_max_len: int = typer.Option(50, help="Most recent items of the behaviour sequence kept per row."),
    sequence: bool = typer.Option(True, help="Use the file's behaviour-sequence column (Parquet list column) if it has one."),
) -> None:
    """Fit per-field vocabularies and numeric statistics on the train file only."""
    from ctr_ensemble.data.fit import fit, parse_min_count

    spec = fit(train, min_count=parse_min_count(min_count), skip_bad_rows=skip_bad_rows, fmt=fmt,
                        seq_max_len=seq_max_len,
                        use_sequence=sequence)
    spec.save(out)
    seq = spec.sequence
    seq_desc = f", sequence {seq.name!r} ({seq.size} ids, max_len {seq.max_len})" if seq else ""
    typer.echo(f"{out}: {spec.n_cat} categorical fields (vocab sizes {min(spec.cat_sizes)}..{max(spec.cat_sizes)}), "
               f"{spec.n_num} numeric{seq_desc}, fitted on {spec.fitted_on['rows']} rows "
               f"({spec.fitted_on['skipped_rows']} skipped)")


@data_app.command("prepare")
def data_prepare(
    input_: list[Path] = typer.Option(..., "--input", help="Raw input file (or Parquet folder); repeat for several files of one format."),
    out: Path = typer.Option(..., help="Output folder: shards/, manifest.json, feature_spec.json."),
    spec: Optional[Path] = typer.Option(None, help="Encode with this feature spec (val/test with the train spec) instead of fitting one."),
    min_count: str = typer.Option("auto", help=MIN_COUNT_HELP + " When fitting."),
    max_distinct: int = typer.Option(0, help="Cap on distinct tokens counted per field (0 = exact); bounds the counting memory."),
    seq_max_len: int = typer.Option(50, help="Most recent items of the behaviour sequence kept per row (when fitting)."),
    sequence: bool = typer.Option(True, help="Use the input's behaviour-sequence column if it has one (when fitting)."),
    chunk_mb: float = typer.Option(64, help="Raw megabytes per chunk (= per shard); a worker holds about 6x this."),
    workers: int = typer.Option(2, help="Processes for the per-chunk work (1 = in this process)."),
    skip_bad_rows: bool = typer.Option(False, help="Skip and count malformed rows instead of stopping."),
    fmt: str = typer.Option("auto", "--format", help="Data format: auto, criteo, avazu, libsvm, parquet."),
) -> None:
    """Encode raw data into shards for training, in bounded memory; resumable (run the same command again)."""
    from ctr_ensemble.data.prepared.prepare import PrepareOptions, prepare

    from ctr_ensemble.data.fit import parse_min_count

    opts = PrepareOptions(fmt=fmt, skip_bad_rows=skip_bad_rows, chunk_mb=chunk_mb, workers=workers,
                          min_count=parse_min_count(min_count),
                          seq_max_len=seq_max_len, use_sequence=sequence, max_distinct=max_distinct)
    r = prepare(input_, out, opts, spec=spec)
    if r.checked:
        typer.echo(f"{out}: already prepared ({r.rows:,} rows, {r.shards} shards); every shard file checked (size, "
                   f"CRC-32){f', {r.chunks_run} damaged shard(s) re-encoded' if r.chunks_run else ', all intact'}")
        return
    what = "fitted its feature spec" if r.spec_fitted else "encoded with the given spec"
    resumed = f", {r.chunks_resumed} chunk(s) done by an earlier run" if r.chunks_resumed else ""
    typer.echo(f"{out}: {r.rows:,} rows in {r.shards} shard(s) ({r.skipped} skipped), {what}; "
               f"{r.chunks_run} chunk(s) read in {r.seconds:.1f}s{resumed}")


@app.command("models")
def models_cmd(as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON.")) -> None:
    """List the member registry with each member's default config."""
    import dataclasses

    from ctr_ensemble import models

    reg = {name: dataclasses.asdict(e.config()) for name, e in models.REGISTRY.items()}
    if as_json:
        typer.echo(json.dumps(reg, indent=2))
    else:
        for name, cfg in reg.items():
            typer.echo(f"{name}: {cfg}")


@app.command("train")
def train_cmd(
    model: str = typer.Option(..., help="Architecture from the registry (see `ctr-ensemble models`)."),
    train: Path = typer.Option(..., help=TRAIN_DATA_HELP),
    val: Path = typer.Option(..., help="Validation data for early stopping on AUC (raw file or prepared folder)."),
    out: Path = typer.Option(..., help="Checkpoint path to write (.pt)."),
    spec: Optional[Path] = typer.Option(None, help="Feature spec JSON (`data fit`); prepared data brings its own."),
    name: Optional[str] = typer.Option(None, help="Member name in the ensemble (default: the architecture)."),
    config: Optional[Path] = typer.Option(None, help="YAML file: model config overrides (flat), or `model:` overrides + "
                                          "`train:` TrainConfig values (e.g. tune's best.yaml); a `train:` key wins "
                                          "over its flag, --set over `model:`."),
    set_: list[str] = typer.Option([], "--set", help="Model config override KEY=VALUE (YAML value); repeatable."),
    fuxictr_config: Optional[Path] = typer.Option(None, help="A FuxiCTR/BARS model_config.yaml: its model and training "
                                                           "keys map one to one (models/fuxictr.py) and win over the flags."),
    fuxictr_exp_id: Optional[str] = typer.Option(None, help="The experiment to take from --fuxictr-config (when it has several)."),
    epochs: int = typer.Option(100, help=EPOCHS_HELP), batch_size: int = typer.Option(512, help=BATCH_HELP),
    lr: float = typer.Option(2e-3),
    weight_decay: float = typer.Option(0.0, help=WEIGHT_DECAY_HELP),
    patience: int = typer.Option(2, help=PATIENCE_HELP),
    plateau_factor: float = typer.Option(0.1, help=PLATEAU_HELP),
    select: str = typer.Option("auc", help=SELECT_HELP),
    embedding_reg_rows: str = typer.Option("auto", help=REG_ROWS_HELP),
    seed: int = typer.Option(42),
    threads: int = typer.Option(0, help="torch CPU threads (0 = torch default)."),
    optimizer: str = typer.Option("adam", help=OPTIMIZER_HELP),
    emb_lr: float = typer.Option(0.0, help=EMB_LR_HELP),
    amp: str = typer.Option("none", help=AMP_HELP),
    compile_: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    streams: int = typer.Option(0, help=STREAMS_HELP),
    prefetch: int = typer.Option(0, help=PREFETCH_HELP),
    dist_timeout: float = typer.Option(300.0, help=DIST_TIMEOUT_HELP),
    verify_shards: str = typer.Option("size", help=VERIFY_HELP),
    skip_bad_rows: bool = typer.Option(False),
    fmt: str = typer.Option("auto", "--format", help="Data format of raw files: auto, criteo, avazu, libsvm, parquet."),
    resume: bool = typer.Option(False, help=RESUME_HELP),
    save_every: int = typer.Option(0, help=SAVE_EVERY_HELP),
) -> None:
    """Train one member (BCE + Adam, early stopping on val AUC); under torchrun, data-parallel over processes."""
    import torch

    from ctr_ensemble import models
    from ctr_ensemble.training import checkpoint, run_config
    from ctr_ensemble.training.trainer import TrainConfig, train_member

    if threads:
        torch.set_num_threads(threads)
    overrides, train_over = run_config.read(config, model) if config is not None else ({}, {})
    if fuxictr_config is not None:
        fx_model, fx_train = _fuxictr_overrides(fuxictr_config, fuxictr_exp_id, model)
        overrides.update(fx_model)
        train_over.update(fx_train)
    overrides.update(_parse_sets(set_))
    model_cfg = models.make_config(model, overrides)
    with _torchrun(device, dist_timeout) as dist:
        fs, tr, va = _training_data(train, val, spec, skip_bad_rows, fmt, verify_shards)
        cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, patience=patience,
                          plateau_factor=plateau_factor, select=select, embedding_reg_rows=embedding_reg_rows, seed=seed,
                          save_every=save_every, optimizer=optimizer, emb_lr=emb_lr, amp=amp,
                          compile=compile_, device=device, streams=streams, prefetch=prefetch)
        cfg = dataclasses.replace(cfg, **train_over)
        state = out.with_suffix(".state.pt")
        ck = train_member(name or model, model, model_cfg, fs, tr, va, cfg, history_csv=out.with_suffix(".history.csv"),
                          state_path=state, resume=resume, dist=dist)
        _write_once(dist, state, lambda: checkpoint.save(ck, out))
    if dist.is_main:
        typer.echo(f"{out}: {ck.name} ({model}) best val AUC {ck.metrics['val_auc']:.4f}, logloss "
                   f"{ck.metrics['val_logloss']:.4f} at epoch {ck.metrics['best_epoch']} (selected on {select})"
                   f"{_processes(dist)}")


def _fuxictr_overrides(path: Path, exp_id: str | None, model: str) -> tuple[dict, dict]:
    """(member config overrides, TrainConfig overrides) from a FuxiCTR model config for ``--model``."""
    from ctr_ensemble.models import fuxictr
    from ctr_ensemble.training.run_config import read_mapping

    try:
        arch, model_over, train_over = fuxictr.from_fuxictr(fuxictr.experiment(read_mapping(path), exp_id))
    except CtrError as e:
        raise CtrError(f"{path}: {e}") from None
    if arch != model:
        raise CtrError(f"{path}: a FuxiCTR {arch} config, but --model is {model}")
    return model_over, train_over


@contextlib.contextmanager
def _torchrun(device: str, timeout_s: float):
    """The torchrun process group of a training command (one plain process without torchrun), torn down at the end."""
    from ctr_ensemble.training import distributed

    dist = distributed.setup(device, timeout_s=timeout_s)
    STATE["dist"] = dist  # errors then name the rank
    try:
        yield dist
    finally:
        distributed.teardown(dist)


def _write_once(dist, state: Path, write) -> None:
    """Outputs written once, by rank 0, then its resume state removed; the other ranks wait for it."""
    from ctr_ensemble.training import distributed
    from ctr_ensemble.training.loop import clear_state

    if dist.is_main:
        write()
        clear_state(state)
    distributed.barrier(dist, "waiting for rank 0 to write the outputs")


def _processes(dist) -> str:
    return f" on {dist.world} processes" if dist.world > 1 else ""


def _training_data(train: Path, val: Path, spec, skip_bad_rows: bool, fmt: str, verify: str, spec_from: str = ""):
    """(spec, train, val): prepared folders are opened (memmaps), raw files encoded into memory. ``spec`` is a
    spec file, a loaded spec (``spec_from`` names where it came from) or None (the prepared folder's own)."""
    from ctr_ensemble.data.encode import encode_file
    from ctr_ensemble.data.prepared.shards import Prepared, is_prepared
    from ctr_ensemble.data.spec import FeatureSpec

    tr = Prepared(train, verify=verify) if is_prepared(train) else None
    va = Prepared(val, verify=verify) if is_prepared(val) else None
    if isinstance(spec, FeatureSpec):
        fs, source = spec, spec_from
    elif spec is not None:
        fs, source = FeatureSpec.load(spec), spec
    elif tr is not None or va is not None:
        fs, source = (tr.spec, train) if tr is not None else (va.spec, val)
    else:
        raise CtrError("--spec is required when --train is a raw file (fit one with `ctr-ensemble data fit`)")
    for p, d in ((train, tr), (val, va)):
        if d is not None and d.spec.fingerprint() != fs.fingerprint():
            raise CtrError(f"{p}: prepared with another feature spec than {source} "
                           f"(fingerprint {d.spec.fingerprint()} vs {fs.fingerprint()}); prepare it with --spec")
    tr = tr if tr is not None else encode_file(train, fs, skip_bad_rows, fmt)
    va = va if va is not None else encode_file(val, fs, skip_bad_rows, fmt)
    return fs, tr, va


@app.command("tune")
def tune_cmd(
    model: str = typer.Option(..., help="Architecture from the registry (see `ctr-ensemble models`)."),
    train: Path = typer.Option(..., help=TRAIN_DATA_HELP),
    val: Path = typer.Option(..., help="Validation data: each trial's best val AUC (or logloss, --select) is its score, "
                                          "each epoch's goes to the pruner."),
    out: Path = typer.Option(..., help="Folder for best.yaml, best.pt, trials.csv, history.png, importance.png, summary.json."),
    spec: Optional[Path] = typer.Option(None, help="Feature spec JSON (`data fit`); prepared data brings its own."),
    test: Optional[Path] = typer.Option(None, help="Test data: summary.json gets the test AUC/logloss of the best trial "
                                                   "and of the default config."),
    trials: int = typer.Option(20, help="Complete + pruned trials the study should have (those of earlier runs count)."),
    timeout: Optional[float] = typer.Option(None, help="Seconds after which no new trial starts."),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL (default sqlite:///OUT/study.db); "
                                                     "the same storage and study name continue the study."),
    study_name: Optional[str] = typer.Option(None, help="Study name (default tune-MODEL)."),
    space: Optional[Path] = typer.Option(None, help="Search space YAML (`model:` and `train:` sections); "
                                                    "default: the shipped space of MODEL."),
    seed: int = typer.Option(42, help="Seed of the TPE sampler and of every trial's training."),
    epochs: int = typer.Option(100, help="Most epochs per trial (early stopping and pruning end most sooner)."),
    select: str = typer.Option("auc", help="The objective: each trial's best val auc (maximised) or val logloss "
                                           "(minimised); the same metric early-stops the trial and goes to the pruner."),
    prune_startup_trials: int = typer.Option(5, help="Trials that run unpruned before the median pruner starts."),
    prune_from_epoch: int = typer.Option(3, help="The first epoch at which a trial can be pruned."),
    enqueue_default: bool = typer.Option(True, help="A new study's first trial is the member's defaults."),
    threads: int = typer.Option(0, help="torch CPU threads (0 = torch default)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    verify_shards: str = typer.Option("size", help=VERIFY_HELP),
    skip_bad_rows: bool = typer.Option(False),
    fmt: str = typer.Option("auto", "--format", help="Data format of raw files: auto, criteo, avazu, libsvm, parquet."),
) -> None:
    """Hyperparameter search over one member with Optuna (TPE, median pruning on per-epoch val AUC); resumable."""
    import torch

    from ctr_ensemble.training import search_space, tune
    from ctr_ensemble.training.trainer import TrainConfig

    if threads:
        torch.set_num_threads(threads)
    sp = search_space.load(model, space)
    fs, tr, va = _training_data(train, val, spec, skip_bad_rows, fmt, verify_shards)
    te = tune.open_rows(test, fs, skip_bad_rows, fmt, verify_shards) if test is not None else None
    opts = tune.TuneOptions(trials=trials, timeout=timeout, storage=storage, study_name=study_name, seed=seed,
                            prune_startup_trials=prune_startup_trials, prune_from_epoch=prune_from_epoch,
                            enqueue_default=enqueue_default)
    res = tune.run(model, fs, tr, va, TrainConfig(epochs=epochs, seed=seed, device=device, select=select), out, sp,
                   opts, test=te)
    if res.best is not None:
        typer.echo(f"best: trial {res.best.number}, val {select} {res.best.value:.4f}; "
                   f"{json.dumps(res.summary['trials'])}")
    for p in res.paths.values():
        typer.echo(f"wrote {p}")


@app.command("train-mutual")
def train_mutual_cmd(
    train: Path = typer.Option(..., help=TRAIN_DATA_HELP),
    val: Path = typer.Option(..., help="Validation data (raw file or prepared folder); model selection on mean member AUC."),
    out_dir: Path = typer.Option(..., help="Folder for one ordinary checkpoint per member (<name>.pt) and the history."),
    model: list[str] = typer.Option([], help="scratch mode: a member architecture; repeat (repeats allowed: deepfm ×2)."),
    checkpoint_: list[Path] = typer.Option([], "--checkpoint", help="finetune mode: an independently trained member; repeat."),
    spec: Optional[Path] = typer.Option(None, help="Feature spec JSON (scratch with raw files: required; prepared data brings its own; "
                                                   "finetune: must match the checkpoints')."),
    mode: Optional[str] = typer.Option(None, help="scratch or finetune (default: finetune with --checkpoint, else scratch)."),
    mutual_weight: float = typer.Option(1.0, help="Weight w of the mutual term (1 = the paper's)."),
    set_: list[str] = typer.Option([], "--set", help="scratch mode: config override ARCH.KEY=VALUE; repeatable."),
    epochs: Optional[int] = typer.Option(None, help="Default: 100 with early stopping (scratch), 1 (finetune)."),
    lr: Optional[float] = typer.Option(None, help="Default: 2e-3 (scratch), 7e-4 (finetune)."),
    lr_decay: Optional[float] = typer.Option(None, help="lr factor per epoch, applied every step. Default: 1 (scratch), 0.1^(1/3) (finetune)."),
    batch_size: int = typer.Option(512, help=BATCH_HELP), weight_decay: float = typer.Option(0.0, help=WEIGHT_DECAY_HELP),
    patience: int = typer.Option(2, help=PATIENCE_HELP), plateau_factor: float = typer.Option(0.1, help=PLATEAU_HELP),
    embedding_reg_rows: str = typer.Option("auto", help=REG_ROWS_HELP), seed: int = typer.Option(42),
    threads: int = typer.Option(0, help="torch CPU threads (0 = torch default)."),
    optimizer: str = typer.Option("adam", help=OPTIMIZER_HELP),
    emb_lr: float = typer.Option(0.0, help=EMB_LR_HELP),
    amp: str = typer.Option("none", help=AMP_HELP),
    compile_: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    streams: int = typer.Option(0, help=STREAMS_HELP),
    prefetch: int = typer.Option(0, help=PREFETCH_HELP),
    dist_timeout: float = typer.Option(300.0, help=DIST_TIMEOUT_HELP),
    verify_shards: str = typer.Option("size", help=VERIFY_HELP),
    resume: bool = typer.Option(False, help=RESUME_HELP),
    save_every: int = typer.Option(0, help=SAVE_EVERY_HELP),
    skip_bad_rows: bool = typer.Option(False),
    fmt: str = typer.Option("auto", "--format", help="Data format of raw files: auto, criteo, avazu, libsvm, parquet."),
) -> None:
    """Deep mutual learning (arXiv 2406.12087): co-train N >= 2 members, each on BCE + w·mean squared gap to its peers;
    under torchrun, data-parallel over processes."""
    import torch

    from ctr_ensemble.data.spec import FeatureSpec
    from ctr_ensemble.training import checkpoint, mutual

    if threads:
        torch.set_num_threads(threads)
    mode = mode or ("finetune" if checkpoint_ else "scratch")
    if mode not in mutual.MODES:
        raise CtrError(f"--mode must be one of {', '.join(mutual.MODES)}, got {mode!r}")
    fs = FeatureSpec.load(spec) if spec is not None else None
    spec_from = str(spec)
    # Everything about the members is checked before any data is read or any step is taken.
    if mode == "finetune":
        if model or set_:
            raise CtrError("finetune mode takes --checkpoint files, not --model/--set")
        members, fs = mutual.members_from_checkpoints(checkpoint_, fs)
        spec_from = spec_from if spec is not None else f"{checkpoint_[0]}'s"
    else:
        if checkpoint_:
            raise CtrError("scratch mode takes --model names, not --checkpoint (use --mode finetune)")
        if len(model) < 2:
            raise CtrError(f"mutual learning needs at least 2 members, got --model {model}")
        members = mutual.members_from_archs(model, _arch_overrides(set_))
    base = mutual.MutualConfig.finetune() if mode == "finetune" else mutual.MutualConfig()
    cfg = mutual.MutualConfig(**{**vars(base), "mutual_weight": mutual_weight, "batch_size": batch_size,
                                 "weight_decay": weight_decay, "patience": patience, "plateau_factor": plateau_factor,
                                 "embedding_reg_rows": embedding_reg_rows, "seed": seed, "save_every": save_every,
                                 "optimizer": optimizer, "emb_lr": emb_lr, "device": device, "streams": streams,
                                 "prefetch": prefetch, "amp": amp, "compile": compile_,
                                 **{k: v for k, v in (("epochs", epochs), ("lr", lr), ("lr_decay", lr_decay)) if v is not None}})
    with _torchrun(device, dist_timeout) as dist:
        fs, tr, va = _training_data(train, val, fs, skip_bad_rows, fmt, verify_shards, spec_from)
        state = out_dir / "mutual.state.pt"
        cks = mutual.train_mutual(members, fs, tr, va, cfg, history_csv=out_dir / "mutual.history.csv",
                                  state_path=state, resume=resume, dist=dist)
        _write_once(dist, state, lambda: [checkpoint.save(ck, out_dir / f"{ck.name}.pt") for ck in cks])
    if dist.is_main:
        for ck in cks:
            typer.echo(f"{out_dir / (ck.name + '.pt')}: {ck.name} ({ck.arch}) val AUC {ck.metrics['val_auc']:.4f} "
                       f"at epoch {ck.metrics['best_epoch']}{_processes(dist)}")


@app.command("train-collab")
def train_collab_cmd(
    model: list[str] = typer.Option(..., help="A member architecture; repeat (N >= 2; the paper's pair: dhen, interformer)."),
    train: Path = typer.Option(..., help=TRAIN_DATA_HELP),
    val: Path = typer.Option(..., help="Validation data (raw file or prepared folder); model selection on the fused AUC "
                                       "(--select)."),
    spec: Optional[Path] = typer.Option(None, help="Feature spec JSON from `ctr-ensemble data fit`; prepared data brings its own."),
    out: Path = typer.Option(..., help="Collaborative checkpoint to write (.pt + .sha256)."),
    kl_weight: float = typer.Option(0.1, help="λ of the symmetric-KL term between member predictions."),
    member_weight: float = typer.Option(0.3, help="μ: weight of the members' own BCE terms (the paper's: 1)."),
    select: str = typer.Option("auc", help="Model selection / early stopping on the fused val auc or the fused val logloss."),
    detach_head: bool = typer.Option(False, help="The head reads the members' outputs detached: its loss trains the head "
                                                 "only, the members learn from their own BCE + KL."),
    tau: float = typer.Option(1.0, help="Temperature τ of softmax(NE(p)/τ) (the initial value with --learn-tau)."),
    learn_tau: bool = typer.Option(False, help="Learn τ (as exp(log τ)) with the rest."),
    variant: str = typer.Option("concat", help="Head input: concat [w_i·h_i] or sum Σ w_i·P_i h_i."),
    head_hidden: str = typer.Option("64", help="Hidden widths of the head MLP, comma-separated ('' = linear head)."),
    proj_dim: int = typer.Option(64, help="sum variant: width the members' h_i are projected to."),
    set_: list[str] = typer.Option([], "--set", help="Member config override ARCH.KEY=VALUE; repeatable."),
    members_out: Optional[Path] = typer.Option(None, help="Also write each member as an ordinary checkpoint in this folder."),
    epochs: int = typer.Option(100, help=EPOCHS_HELP), batch_size: int = typer.Option(512, help=BATCH_HELP),
    lr: float = typer.Option(2e-3),
    lr_decay: float = typer.Option(1.0, help="lr factor per epoch, applied every step (1 = constant)."),
    weight_decay: float = typer.Option(0.0, help=WEIGHT_DECAY_HELP), patience: int = typer.Option(2, help=PATIENCE_HELP),
    plateau_factor: float = typer.Option(0.1, help=PLATEAU_HELP),
    embedding_reg_rows: str = typer.Option("auto", help=REG_ROWS_HELP), seed: int = typer.Option(42),
    threads: int = typer.Option(0, help="torch CPU threads (0 = torch default)."),
    optimizer: str = typer.Option("adam", help=OPTIMIZER_HELP),
    emb_lr: float = typer.Option(0.0, help=EMB_LR_HELP),
    amp: str = typer.Option("none", help=AMP_HELP),
    compile_: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    streams: int = typer.Option(0, help=STREAMS_HELP),
    prefetch: int = typer.Option(0, help=PREFETCH_HELP),
    dist_timeout: float = typer.Option(300.0, help=DIST_TIMEOUT_HELP),
    verify_shards: str = typer.Option("size", help=VERIFY_HELP),
    resume: bool = typer.Option(False, help=RESUME_HELP),
    save_every: int = typer.Option(0, help=SAVE_EVERY_HELP),
    skip_bad_rows: bool = typer.Option(False),
    fmt: str = typer.Option("auto", "--format", help="Data format of raw files: auto, criteo, avazu, libsvm, parquet."),
) -> None:
    """Collaborative ensemble (CETNet, arXiv 2411.13700): members + confidence-weighted head trained jointly;
    under torchrun, data-parallel over processes."""
    import torch

    from ctr_ensemble.training import checkpoint, collab, mutual

    if threads:
        torch.set_num_threads(threads)
    if len(model) < 2:
        raise CtrError(f"a collaborative ensemble needs at least 2 members, got --model {model}")
    try:
        hidden = [int(h) for h in _split_list(head_hidden)]
    except ValueError as e:
        raise CtrError(f"--head-hidden expects comma-separated integers, got {head_hidden!r}") from e
    members = mutual.members_from_archs(model, _arch_overrides(set_))
    cfg = collab.CollabConfig(epochs=epochs, batch_size=batch_size, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                              patience=patience, plateau_factor=plateau_factor, embedding_reg_rows=embedding_reg_rows,
                              seed=seed, save_every=save_every, optimizer=optimizer, emb_lr=emb_lr,
                              device=device, streams=streams, prefetch=prefetch, amp=amp, compile=compile_, kl_weight=kl_weight,
                              member_weight=member_weight, select=select, detach_head=detach_head,
                              head=collab.HeadConfig(variant=variant, hidden=hidden, proj_dim=proj_dim, tau=tau, learn_tau=learn_tau))

    def write(ck: collab.CollabCheckpoint) -> None:
        collab.save(ck, out)
        for m in ck.members if members_out is not None else ():
            checkpoint.save(m, members_out / f"{m.name}.pt")

    with _torchrun(device, dist_timeout) as dist:
        fs, tr, va = _training_data(train, val, spec, skip_bad_rows, fmt, verify_shards)
        state = out.with_suffix(".state.pt")
        ck = collab.train_collab(members, fs, tr, va, cfg, history_csv=out.with_suffix(".history.csv"),
                                 state_path=state, resume=resume, dist=dist)
        _write_once(dist, state, lambda: write(ck))
    if dist.is_main:
        per_member = ", ".join(f"{m.name} {m.metrics['val_auc']:.4f}" for m in ck.members)
        typer.echo(f"{out}: collaborative ensemble of {', '.join(ck.names)}: fused val AUC {ck.metrics['val_auc']:.4f} "
                   f"(members: {per_member}) at epoch {ck.metrics['best_epoch']}{_processes(dist)}")


@app.command("export")
def export_cmd(
    checkpoint_: list[Path] = typer.Option([], "--checkpoint", help="Member checkpoint (.pt); repeat for each member."),
    collab: Optional[Path] = typer.Option(None, help="A collaborative checkpoint (train-collab) instead of --checkpoint: "
                                                     "serves its members and trained head (fusion mode collaborative)."),
    repository: Path = typer.Option(Path("model_repository"), help="Triton model repository to (re)write atomically."),
    from_repository: Optional[Path] = typer.Option(None, help="Instead of checkpoints: copy this exported repository "
                                                   "and rewrite only its configs with the options below (no re-export)."),
    parity_data: Optional[Path] = typer.Option(None, help="Labelled file whose rows are used for the ONNX parity check."),
    parity_rows: int = typer.Option(4096, help="Rows of --parity-data to check."),
    fusion_mode: str = typer.Option("negation_entropy", help="negation_entropy, mean, or fitted (with --from-repository of "
                                    "a --fit-fusion export; collaborative comes with --collab)."),
    tau: float = typer.Option(1.0, help="Temperature of the confidence softmax."),
    fit_fusion: Optional[Path] = typer.Option(None, help="Validation file: fit τ, a prior per member and the averaging space "
                                              "on it (min logloss; never worse than the best member there) and serve "
                                              "that fitted rule (overrides --fusion-mode/--tau)."),
    fusion_space: str = typer.Option("auto", help="With --fit-fusion: prob, logit, or auto (fit both, keep the lower "
                                     "validation logloss)."),
    fusion_report_data: Optional[Path] = typer.Option(None, help="With --fit-fusion: a test file the fit report also scores."),
    fusion_kind: str = typer.Option("auto", help="Fusion instance kind: auto (GPU if torch sees one), cpu, gpu."),
    max_batch_size: int = typer.Option(4096), instances: int = typer.Option(1, help="Instances per member."),
    intra_op_threads: int = typer.Option(1, help="ONNX Runtime threads per member instance."),
    max_queue_delay_us: int = typer.Option(200, help="Dynamic batching queue delay per member."),
    dynamic_batching: bool = typer.Option(True, help="Dynamic batching on the members."),
    production: bool = typer.Option(False, help="Configs for the NGC container (docker-compose.yml): members on KIND_GPU "
                                    "with the CUDA execution provider, fusion on KIND_GPU. Needs a GPU to load."),
    fmt: str = typer.Option("auto", "--format", help="Data format: auto, criteo, avazu, libsvm, parquet."),
) -> None:
    """Export members to ONNX (parity-checked) and write the Triton model repository."""
    from dataclasses import replace

    from ctr_ensemble.data.encode import encode_file
    from ctr_ensemble.export.repository import RepoOptions, manifest_rule, reconfigure_repository, write_repository
    from ctr_ensemble.training import checkpoint

    opt = RepoOptions(max_batch_size=max_batch_size, instances=instances, intra_op_threads=intra_op_threads,
                      dynamic_batching=dynamic_batching, max_queue_delay_us=max_queue_delay_us, fusion_mode=fusion_mode,
                      tau=tau, fusion_kind=fusion_kind, production=production)
    if sum((bool(checkpoint_), from_repository is not None, collab is not None)) != 1:
        raise CtrError("give exactly one of: --checkpoint (one per member), --collab (a collaborative checkpoint) "
                       "or --from-repository")
    if fit_fusion is not None and (from_repository is not None or collab is not None):
        raise CtrError("--fit-fusion fits a rule over member checkpoints (--checkpoint); a collaborative checkpoint brings "
                       "its trained head, and --from-repository --fusion-mode fitted reuses a fitted export's rule")
    if from_repository is not None:
        manifest = reconfigure_repository(from_repository, repository, opt)
        typer.echo(f"{repository}: configs of {from_repository} rewritten ({', '.join(manifest['members'])}; "
                   f"fusion {opt.fusion_mode} on {manifest['fusion']['kind']}{', production' if production else ''})")
        return
    cc = None
    if collab is not None:
        from ctr_ensemble.training import collab as collab_io

        cc = collab_io.load(collab)
        cks, opt = cc.members, replace(opt, fusion_mode="collaborative")
    else:
        cks = [checkpoint.load(p) for p in checkpoint_]
    fit = None
    if fit_fusion is not None:
        from ctr_ensemble.export import fusion_fit

        rule, fit = fusion_fit.fit_files(cks, fit_fusion, fusion_report_data, fusion_space, fmt)
        opt = replace(opt, fusion_mode=rule.mode, tau=rule.tau, priors=list(rule.priors), space=rule.space)
    rows = None
    if parity_data is not None:
        arr = encode_file(parity_data, cks[0].spec, fmt=fmt)
        rows = arr.feeds(slice(0, parity_rows))
    manifest = write_repository(cks, repository, opt, parity_rows=rows, collab=cc, fusion_fit=fit)
    for n, m in manifest["members"].items():
        par = m.get("parity")
        extra = f", ONNX parity max|Δ| {max(par['prob_max_abs_diff'], m['parity_stress']['prob_max_abs_diff']):.2e}" if par else ""
        typer.echo(f"{repository}/{n}: {m['arch']}{extra}")
    f = manifest["fusion"]
    extra = f", fused parity max|Δ| {f['parity']['prob_max_abs_diff']:.2e}" if "parity" in f else ""
    if fit is not None:
        typer.echo(fusion_fit.render(fit["report"]))
        extra += f"; fitted on {fit_fusion} ({fit['rows']:,} rows), kept: {fit['chosen']}"
    rule_desc = f"{f['mode']} (tau={f['tau']})" if cc is not None else manifest_rule(manifest).describe()
    typer.echo(f"{repository}/ctr_ensemble: fusion {rule_desc} on {f['kind']}{extra}")


@app.command("check-repo")
def check_repo_cmd(
    repository: Path = typer.Option(Path("model_repository"), help="Triton model repository to validate."),
) -> None:
    """Validate a model repository without starting Triton: configs, ONNX files (checksum, checker,
    inputs/outputs vs config), Python models, ensemble wiring, feature specs. Exit 2 on any problem."""
    from ctr_ensemble.export import validate

    validate.check(repository)
    typer.echo(f"{repository}: OK ({len(list(Path(repository).glob('*/config.pbtxt')))} models)")


@app.command("check-export")
def check_export_cmd(
    model: Optional[str] = typer.Option(None, help="Architecture: build from its default config, train a few steps on generated data."),
    checkpoint_: Optional[Path] = typer.Option(None, "--checkpoint", help="Check your own checkpoint instead of --model."),
    data: Optional[Path] = typer.Option(None, help="Rows to compare on (Criteo TSV layout); default: generated."),
    set_: list[str] = typer.Option([], "--set", help="Config override KEY=VALUE for --model; repeatable."),
    rows: int = typer.Option(4096, help="Rows to compare (each also as an OOV/NaN copy)."),
    steps: int = typer.Option(30, help="Training steps before export (with --model)."),
    seed: int = typer.Option(0),
    sequence: bool = typer.Option(True, help="With --model: generated data has a behaviour sequence (checks lengths 0, 1, max)."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Export a member to ONNX and compare ONNX Runtime with PyTorch; exit 1 if max |Δ| > 1e-5."""
    from ctr_ensemble.export import check

    if (model is None) == (checkpoint_ is None):
        raise CtrError("give exactly one of --model NAME or --checkpoint PATH")
    if model is not None:
        from ctr_ensemble import models

        models.entry(model)
    res = check.run(model, checkpoint_, data, _parse_sets(set_), rows=rows, steps=steps, seed=seed, sequence=sequence)
    if as_json:
        typer.echo(json.dumps(res, indent=2))
    else:
        for part in res["cases"]:
            r = res[part]
            typer.echo(f"{res['model']} {part:12s} rows={r['rows']:5d}  prob max|Δ|={r['prob_max_abs_diff']:.3e}  "
                       f"repr max|Δ|={r['repr_max_abs_diff']:.3e}")
        verdict = "PASS" if res["passed"] else "FAIL"
        typer.echo(f"{verdict}: max abs diff {res['max_abs_diff']:.3e} (tolerance {res['tolerance']:g})")
    if not res["passed"]:
        raise typer.Exit(1)


@app.command("serve")
def serve_cmd(
    repository: Path = typer.Option(Path("model_repository"), help="Triton model repository."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (HTTP, gRPC, metrics)."),
    http_port: int = typer.Option(8000), grpc_port: int = typer.Option(8001), metrics_port: int = typer.Option(8002),
    startup_timeout: float = typer.Option(180.0, help="Seconds to wait for readiness."),
    log_verbose: int = typer.Option(0, help="tritonserver --log-verbose level."),
    admin_key: Optional[str] = typer.Option(None, envvar="TRITON_ADMIN_KEY", show_default=False,
                                            help="Key for the admin APIs (header admin-key); default: a random "
                                                 "key nobody knows, i.e. admin APIs closed."),
    open_admin: bool = typer.Option(False, help="Leave the admin APIs unrestricted (not recommended)."),
    supervise: bool = typer.Option(True, help="Restart the server when it dies or a backend stub dies "
                                              "(Triton does not recover a killed stub by itself)."),
    max_restarts: int = typer.Option(5, help="Give up after this many restarts."),
) -> None:
    """Run the local tritonserver (from nvidia-pytriton) until Ctrl-C."""
    from ctr_ensemble.serving.server import TritonServer, default_admin_key

    server = TritonServer(repository, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          startup_timeout=startup_timeout, log_verbose=log_verbose,
                          log_path=Path("artifacts/tritonserver.log").resolve(),
                          admin_key=None if open_admin else (admin_key or default_admin_key()))
    Path("artifacts").mkdir(exist_ok=True)
    from ctr_ensemble.serving.supervisor import Supervisor

    sup = Supervisor(server, max_restarts=max_restarts) if supervise else None
    sup.start() if sup else server.start()
    typer.echo(f"Triton ready: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.metrics_url} "
               f"(log {server.log_path}); {'supervised, ' if sup else ''}Ctrl-C to stop")
    stop = {"now": False}

    def _on_signal(*_):
        stop["now"] = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    import time

    seen = 0
    while not stop["now"] and (server.is_running() if sup is None else sup.error is None):
        time.sleep(0.5)
        if sup is not None and len(sup.restarts) > seen:
            for r in sup.restarts[seen:]:
                typer.echo(f"restarted tritonserver after: {r['reason']} ({r['seconds']:.1f}s)", err=True)
            seen = len(sup.restarts)
    if sup is not None and sup.error is not None:
        sup.stop()
        raise CtrError(f"tritonserver supervision stopped: {sup.error}; log:\n{server.log_tail()}")
    if sup is None and not server.is_running():
        raise CtrError(f"tritonserver exited unexpectedly; log:\n{server.log_tail()}")
    code = sup.stop() if sup else server.stop()
    typer.echo(f"tritonserver stopped (exit code {code})")


@app.command("evaluate")
def evaluate_cmd(
    data: Path = typer.Option(..., help="Labelled file (Criteo TSV layout) to score."),
    repository: Path = typer.Option(Path("model_repository"), help="Model repository written by `export`."),
    backends: str = typer.Option("torch,onnx,triton_http,triton_grpc", help="Comma list of backends."),
    truth: Optional[Path] = typer.Option(None, help="True click probabilities (.p.npy) for the oracle AUC."),
    checkpoint_: list[str] = typer.Option([], "--checkpoint", help="NAME=PATH to override a member's checkpoint."),
    http_url: Optional[str] = typer.Option(None, help="Triton HTTP host:port (default: the started server)."),
    grpc_url: Optional[str] = typer.Option(None, help="Triton gRPC host:port."),
    start_server: bool = typer.Option(False, help="Start a local server on free ports for the run."),
    batch_size: int = typer.Option(1024, help="Rows per Triton request."),
    out: Optional[Path] = typer.Option(None, help="Write the summary JSON here."),
    skip_bad_rows: bool = typer.Option(False),
    fmt: str = typer.Option("auto", "--format", help="Data format: auto, criteo, avazu, libsvm, parquet."),
) -> None:
    """Score a labelled file through each backend; AUC, logloss, NE, calibration, ECE, rows/s, max |Δ| vs PyTorch."""
    from rich.console import Console

    from ctr_ensemble.evaluation.evaluate import EvalTargets, evaluate, render_table
    from ctr_ensemble.serving.server import TritonServer

    ckpts = dict(_kv(c, "--checkpoint") for c in checkpoint_)
    server = None
    try:
        if start_server:
            server = TritonServer(repository).start()
            http_url, grpc_url = http_url or server.http_url, grpc_url or server.grpc_url
        summary = evaluate(data, repository, _split_list(backends), EvalTargets(http_url, grpc_url, batch_size),
                           truth=truth, checkpoints=ckpts, skip_bad_rows=skip_bad_rows, fmt=fmt)
    finally:
        if server is not None:
            server.stop()
    Console().print(render_table(summary))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2))
        typer.echo(f"wrote {out}")


def _kv(s: str, flag: str) -> tuple[str, str]:
    if "=" not in s:
        raise CtrError(f"{flag} expects NAME=PATH, got {s!r}")
    k, v = s.split("=", 1)
    return k, v


@app.command("loadtest")
def loadtest_cmd(
    repository: Path = typer.Option(Path("model_repository"), help="Model repository (served, or the base of the sweep's variants)."),
    data: Path = typer.Option(Path("artifacts/demo/data/test.tsv"), help="Held-out labelled file whose rows are sent."),
    model: str = typer.Option("ctr_ensemble", help="Model to load-test (without --sweep)."),
    protocol: Optional[str] = typer.Option(None, help="Comma list: grpc, http (default both; with --sweep the sweep's)."),
    users: Optional[str] = typer.Option(None, help="Concurrent users, comma list (default 4; with --sweep the sweep's)."),
    spawn_rate: float = typer.Option(0.0, help="Users started per second (0 = all at once)."),
    duration: Optional[float] = typer.Option(None, help="Seconds per run (default 20; sweep 6)."),
    warmup: Optional[float] = typer.Option(None, help="Seconds dropped from the start of each run (default 3; sweep 1.5)."),
    rows_per_request: Optional[int] = typer.Option(None, help="Rows per request (default 64)."),
    max_rows: Optional[int] = typer.Option(None, help="Held-out rows cycled through (default 8192)."),
    url: Optional[str] = typer.Option(None, help="Host of a running Triton (no server is started); needs --repository for the offline reference."),
    http_port: int = typer.Option(8000), grpc_port: int = typer.Option(8001), metrics_port: int = typer.Option(8002),
    admin_key: Optional[str] = typer.Option(None, envvar="TRITON_ADMIN_KEY", help="Admin key of the running server (perf_analyzer reads the model config)."),
    sweep: bool = typer.Option(False, "--sweep", help="Run the default list of deployment variants (or --sweep-config)."),
    sweep_config: Optional[Path] = typer.Option(None, help="YAML sweep: variants and settings (implies --sweep)."),
    perf_analyzer: bool = typer.Option(True, help="Also measure each run with perf_analyzer."),
    perf_analyzer_bin: Optional[Path] = typer.Option(None, "--perf-analyzer-bin", help="perf_analyzer binary (default: .venv-perf, $PERF_ANALYZER, PATH)."),
    locustfile: Optional[Path] = typer.Option(None, help="Locust file (default loadtest/locustfile.py)."),
    out: Path = typer.Option(Path("artifacts/loadtest"), help="Output folder for latency_vs_auc.{csv,md,png}."),
    prepare_only: Optional[Path] = typer.Option(None, help="Only write rows.npz + config.json for the docker-compose "
                                                "locust services into this folder (URLs triton:8000/8001) and exit."),
    fmt: str = typer.Option("auto", "--format", help="Data format: auto, criteo, avazu, libsvm, parquet."),
) -> None:
    """Locust (headless) against Triton: throughput, p50/p95/p99, errors, served vs offline AUC; --sweep over variants."""
    import dataclasses

    from rich.console import Console

    from ctr_ensemble.loadtest import perf, report, sweep as lt

    protocols = _split_list(protocol) if protocol else None
    user_list = [int(u) for u in _split_list(users)] if users else None
    if prepare_only is not None:
        _prepare_compose(repository, data, model, rows_per_request or 64, max_rows or 8192, prepare_only, fmt)
        return
    if sweep or sweep_config:
        cfg = lt.load_sweep(sweep_config) if sweep_config else lt.default_sweep()
    else:
        cfg = lt.SweepConfig(variants=[lt.Variant(model, model)], users=[4], duration_s=20.0, warmup_s=3.0)
    over = {"protocols": protocols, "users": user_list, "duration_s": duration, "warmup_s": warmup, "spawn_rate": spawn_rate or None,
            "rows_per_request": rows_per_request, "max_rows": max_rows, "perf_analyzer": perf_analyzer or None}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if v is not None})
    if not perf_analyzer:
        cfg.perf_analyzer = False
    target = None
    if url is not None:
        target = lt.Target(url, http_port, grpc_port, metrics_port, repository, admin_key)
    console = Console(width=None if sys.stdout.isatty() else 200)
    binary = perf.find_binary(perf_analyzer_bin)
    res = lt.run_sweep(cfg, repository, data, out, target=target, perf_binary=binary,
                       locustfile=locustfile or lt.LOCUSTFILE, fmt=fmt, console=console)
    context = {"repository": str(repository), "data": f"{data} (first {cfg.max_rows} rows)",
               "server": f"{url} (running)" if url else "local tritonserver started per deployment, production flags incl. admin-API restriction",
               "load": f"Locust headless, closed loop, {cfg.rows_per_request} rows/request, {cfg.duration_s:g}s per run, "
                       f"{cfg.warmup_s:g}s warm-up dropped",
               "perf_analyzer": str(binary) if cfg.perf_analyzer and binary else "not run"}
    paths = report.write_report(res.rows, res.server_rows, out, context)
    for p in paths.values():
        typer.echo(f"wrote {p}")
    if res.failed:
        bad = [f"{r['variant']}/{r.get('protocol')}/{r.get('users')}: {r.get('status')} errors={r.get('errors')}"
               for r in res.rows if r["status"] not in ("ok", "skipped") or r.get("errors")]
        typer.echo("load test failed: " + "; ".join(bad), err=True)
        raise typer.Exit(1)


@app.command("soak")
def soak_cmd(
    repository: Path = typer.Option(Path("model_repository"), help="Model repository (served, and the offline reference)."),
    data: Path = typer.Option(Path("artifacts/demo/data/test.tsv"), help="Held-out labelled file whose rows are sent."),
    model: str = typer.Option("ctr_ensemble", help="Model to soak."),
    duration: float = typer.Option(600.0, help="Seconds of load (default 10 minutes)."),
    max_requests: int = typer.Option(2_000_000, help="Bound on requests over all protocols; the run stops when reached."),
    protocol: str = typer.Option("grpc,http", help="Comma list; one concurrent Locust process per protocol."),
    users: int = typer.Option(2, help="Concurrent users per protocol."),
    rows_per_request: int = typer.Option(64),
    max_rows: int = typer.Option(8192, help="Held-out rows cycled through."),
    window: float = typer.Option(60.0, help="Seconds per window; p99 drift = last window's p99 - first window's."),
    sample: float = typer.Option(5.0, help="Seconds between server RSS samples."),
    rss_warn_mb: float = typer.Option(100.0, help="RSS growth after the first window flagged as a suspected leak."),
    url: Optional[str] = typer.Option(None, help="Host of a running Triton (no server is started)."),
    http_port: int = typer.Option(8000), grpc_port: int = typer.Option(8001), metrics_port: int = typer.Option(8002),
    server_pid: Optional[int] = typer.Option(None, help="With --url on this machine: tritonserver's pid, for the RSS leak check."),
    out: Path = typer.Option(Path("artifacts/soak"), help="Output folder for soak.{json,md,png}, soak_windows.csv, rss.csv."),
    fmt: str = typer.Option("auto", "--format", help="Data format: auto, criteo, avazu, libsvm, parquet."),
) -> None:
    """Long Locust load on one model: requests, errors (must be 0), p99 drift first vs last window, server RSS start/end."""
    from rich.console import Console

    from ctr_ensemble.loadtest import soak as sk
    from ctr_ensemble.loadtest import sweep as lt

    cfg = sk.SoakConfig(model=model, duration_s=duration, protocols=_split_list(protocol), users=users,
                        rows_per_request=rows_per_request, max_rows=max_rows, max_requests=max_requests, window_s=window,
                        sample_s=sample, rss_warn_mb=rss_warn_mb)
    target = lt.Target(url, http_port, grpc_port, metrics_port, repository) if url is not None else None
    console = Console(width=None if sys.stdout.isatty() else 200)
    s = sk.run_soak(cfg, repository, data, out, target=target, server_pid=server_pid, fmt=fmt, console=console)
    typer.echo((out / "soak.md").read_text())
    typer.echo(f"wrote {out / 'soak.json'}, {out / 'soak.md'}, {out / 'soak.png'}")
    if not s["passed"]:
        typer.echo(f"soak failed: {s['errors']} errors, {s['requests']} requests, server alive: {s['server_alive']}", err=True)
        raise typer.Exit(1)


def _prepare_compose(repository: Path, data: Path, model: str, rows_per_request: int, max_rows: int, dest: Path, fmt: str) -> None:
    """rows.npz + config.json for the locust services of docker-compose.yml (mounted at /loadtest/run)."""
    from ctr_ensemble.loadtest import sweep as lt
    from ctr_ensemble.loadtest.rows import inputs_from_config, load_rows

    inputs = inputs_from_config(repository, model)
    rows = load_rows(data, repository, model, inputs, max_rows, fmt)
    lt.save_rows(rows, dest / "rows.npz")
    lt.write_run_config(dest / "config.json", http_url="triton:8000", grpc_url="triton:8001", model=model,
                        rows_file=f"{lt.COMPOSE_RUN_DIR}/rows.npz", inputs=inputs, rows_per_request=rows_per_request,
                        timeout_s=10.0, max_requests=10_000_000, results_dir=f"{lt.COMPOSE_RUN_DIR}/results")
    typer.echo(f"wrote {dest / 'rows.npz'} ({len(rows['label'])} rows) and {dest / 'config.json'} for docker compose")


@app.command("demo")
def demo_cmd(
    members: str = typer.Option("deepfm,dcnv2", help="Comma list of architectures to train and serve."),
    out: Path = typer.Option(Path("artifacts/demo"), help="Folder for data, checkpoints and summary.json."),
    repository: Path = typer.Option(Path("model_repository"), help="Where to write the Triton repository."),
    train_rows: int = typer.Option(300_000), epochs: int = typer.Option(8), seed: int = typer.Option(42),
    seq_max_len: int = typer.Option(0, help="> 0: the synthetic data carries a behaviour sequence of this many "
                                             "recent items (Parquet), fed to every member."),
) -> None:
    """The whole pipeline on the embedded synthetic default: data → train → export → serve → evaluate."""
    from ctr_ensemble.demo import run_demo

    ok = run_demo(_split_list(members), out, repository, train_rows=train_rows, epochs=epochs, seed=seed,
                  seq_max_len=seq_max_len)
    if not ok:
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except CtrError as e:
        if STATE["debug"]:
            raise
        dist = STATE.get("dist")
        where = f"{dist.tag()}: " if dist is not None and dist.active and not str(e).startswith(dist.tag()) else ""
        typer.echo(f"error: {where}{e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
