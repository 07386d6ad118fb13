"""``ctr-ensemble models``, ``train``, ``tune``, ``train-mutual``, ``train-collab``: members trained alone, tuned,
or together.

Every ``TrainConfig`` field is an option of each training command (``options.config_options``), as are the
data and run options; a command declares by hand only what is its own."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ctr_ensemble.cli.app import STATE, app, arch_overrides, parse_sets, split_list
from ctr_ensemble.cli.options import DataOptions, RunOptions, config_options, format_option, given
from ctr_ensemble.errors import CtrError
from ctr_ensemble.files import check_name
from ctr_ensemble.training.collab import CollabConfig, HeadConfig
from ctr_ensemble.training.mutual import MutualConfig
from ctr_ensemble.training.config import TrainConfig

TRAIN_DATA_HELP = "Training data: a raw file, or a folder from `data prepare`."
MODEL_HELP = "Architecture from the registry (see `ctr-ensemble models`)."
# train-mutual's finetune mode has other defaults for these (MutualConfig.finetune): None = the mode's
MODE_DEFAULTS = {"epochs": None, "lr": None, "lr_decay": None}


def _threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _run(run: dict, device: str):
    """The process group of a training command, kept in STATE so that errors name the rank."""
    from ctr_ensemble.training import distributed

    return distributed.process_group(device, run["dist_timeout"], on_start=lambda d: STATE.__setitem__("dist", d))


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
@config_options(TrainConfig)
@config_options(DataOptions, dest="data")
@config_options(RunOptions, dest="run")
def train_cmd(
    model: str = typer.Option(..., help=MODEL_HELP),
    train: Path = typer.Option(..., help=TRAIN_DATA_HELP),
    val: Path = typer.Option(..., help="Validation data for early stopping (raw file or prepared folder)."),
    out: Path = typer.Option(..., help="Checkpoint path to write (.pt)."),
    name: Optional[str] = typer.Option(None, help="Member name in the ensemble (default: the architecture)."),
    config: Optional[Path] = typer.Option(None, help="YAML file: model config overrides (flat), or `model:` overrides + "
                                          "`train:` TrainConfig values (e.g. tune's best.yaml); a `train:` key wins "
                                          "over its flag, --set over `model:`."),
    set_: list[str] = typer.Option([], "--set", help="Model config override KEY=VALUE (YAML value); repeatable."),
    fuxictr_config: Optional[Path] = typer.Option(None, help="A FuxiCTR/BARS model_config.yaml: its model and training "
                                                           "keys map one to one (models/fuxictr.py) and win over the flags."),
    fuxictr_exp_id: Optional[str] = typer.Option(None, help="The experiment to take from --fuxictr-config (when it has several)."),
    fmt: str = format_option(),
    settings: dict = None, data: dict = None, run: dict = None,
) -> None:
    """Train one member (BCE + the member's regularizers + Adam, early stopping on the val metric); under torchrun,
    data-parallel over processes."""
    from ctr_ensemble import models
    from ctr_ensemble.models import checkpoint
    from ctr_ensemble.training import run_config
    from ctr_ensemble.training.distributed import on_processes
    from ctr_ensemble.training.loop import write_once
    from ctr_ensemble.training.member import train_member

    check_name(model if name is None else name, "train --name")  # it becomes the member's folder in the Triton repository
    _threads(run["threads"])
    overrides, train_over = run_config.read(config, model) if config is not None else ({}, {})
    if fuxictr_config is not None:
        fx_model, fx_train = _fuxictr_overrides(fuxictr_config, fuxictr_exp_id, model)
        overrides.update(fx_model)
        train_over.update(fx_train)
    overrides.update(parse_sets(set_))
    model_cfg = models.make_config(model, overrides)
    cfg = TrainConfig(**{**settings, **train_over})
    with _run(run, cfg.device) as dist:
        fs, tr, va = _training_data(train, val, data["spec"], data["skip_bad_rows"], fmt, data["verify_shards"])
        state = out.with_suffix(".state.pt")
        ck = train_member(name or model, model, model_cfg, fs, tr, va, cfg, history_csv=out.with_suffix(".history.csv"),
                          state_path=state, resume=run["resume"], dist=dist)
        write_once(dist, state, lambda: checkpoint.save(ck, out))
    if dist.is_main:
        typer.echo(f"{out}: {ck.name} ({model}) best val AUC {ck.metrics['val_auc']:.4f}, logloss "
                   f"{ck.metrics['val_logloss']:.4f} at epoch {ck.metrics['best_epoch']} (selected on {cfg.select})"
                   f"{on_processes(dist)}")


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
@config_options(TrainConfig, only=("epochs", "seed", "device", "select"))
@config_options(DataOptions, dest="data")
def tune_cmd(
    model: str = typer.Option(..., help=MODEL_HELP),
    train: Path = typer.Option(..., help=TRAIN_DATA_HELP),
    val: Path = typer.Option(..., help="Validation data: each trial's best val AUC (or logloss, --select) is its score, "
                                       "each epoch's goes to the pruner."),
    out: Path = typer.Option(..., help="Folder for best.yaml, best.pt, trials.csv, history.png, importance.png, summary.json."),
    test: Optional[Path] = typer.Option(None, help="Test data: summary.json gets the test AUC/logloss of the best trial "
                                                   "and of the default config."),
    trials: int = typer.Option(20, help="Complete + pruned trials the study should have (those of earlier runs count)."),
    timeout: Optional[float] = typer.Option(None, help="Seconds after which no new trial starts."),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL (default sqlite:///OUT/study.db); "
                                                     "the same storage and study name continue the study."),
    study_name: Optional[str] = typer.Option(None, help="Study name (default tune-MODEL)."),
    space: Optional[Path] = typer.Option(None, help="Search space YAML (`model:` and `train:` sections); "
                                                    "default: the shipped space of MODEL."),
    prune_startup_trials: int = typer.Option(5, help="Trials that run unpruned before the median pruner starts."),
    prune_from_epoch: int = typer.Option(3, help="The first epoch at which a trial can be pruned."),
    enqueue_default: bool = typer.Option(True, help="A new study's first trial is the member's defaults."),
    refit: bool = typer.Option(False, help="With --test: also retrain the best and the default config on train + val "
                                           "for their own best epoch count and test those (summary.json test.refit)."),
    threads: int = typer.Option(0, help=RunOptions.__dataclass_fields__["threads"].metadata["help"]),
    fmt: str = format_option(),
    settings: dict = None, data: dict = None,
) -> None:
    """Hyperparameter search over one member with Optuna (TPE, median pruning on the per-epoch val metric); resumable.
    --seed seeds the sampler and every trial's training; --select auc maximises, logloss minimises."""
    from ctr_ensemble.training import search_space, tune

    _threads(threads)
    sp = search_space.load(model, space)
    fs, tr, va = _training_data(train, val, data["spec"], data["skip_bad_rows"], fmt, data["verify_shards"])
    te = tune.open_rows(test, fs, data["skip_bad_rows"], fmt, data["verify_shards"]) if test is not None else None
    if refit and te is None:
        raise typer.BadParameter("--refit needs --test (it reports the refitted configs' test metrics)")
    opts = tune.TuneOptions(trials=trials, timeout=timeout, storage=storage, study_name=study_name, seed=settings["seed"],
                            prune_startup_trials=prune_startup_trials, prune_from_epoch=prune_from_epoch,
                            enqueue_default=enqueue_default, refit=refit)
    res = tune.run(model, fs, tr, va, TrainConfig(**settings), out, sp, opts, test=te)
    if res.best is not None:
        typer.echo(f"best: trial {res.best.number}, val {settings['select']} {res.best.value:.4f}; "
                   f"{json.dumps(res.summary['trials'])}")
    for p in res.paths.values():
        typer.echo(f"wrote {p}")


@app.command("train-mutual")
@config_options(TrainConfig, defaults=MODE_DEFAULTS)
@config_options(MutualConfig, only=("mutual_weight",), dest="mutual")
@config_options(DataOptions, skip=("spec",), dest="data")
@config_options(RunOptions, dest="run")
def train_mutual_cmd(
    train: Path = typer.Option(..., help=TRAIN_DATA_HELP),
    val: Path = typer.Option(..., help="Validation data (raw file or prepared folder); model selection on the members' "
                                       "mean val metric."),
    out_dir: Path = typer.Option(..., help="Folder for one ordinary checkpoint per member (<name>.pt) and the history."),
    model: list[str] = typer.Option([], help="scratch mode: a member architecture; repeat (repeats allowed: deepfm ×2)."),
    checkpoint_: list[Path] = typer.Option([], "--checkpoint", help="finetune mode: an independently trained member; repeat."),
    spec: Optional[Path] = typer.Option(None, help="Feature spec JSON (scratch with raw files: required; prepared data "
                                                   "brings its own; finetune: must match the checkpoints')."),
    mode: Optional[str] = typer.Option(None, help="scratch or finetune (default: finetune with --checkpoint, else "
                                                  "scratch); finetune's defaults: 1 epoch, lr 7e-4, lr_decay 0.1^(1/3)."),
    set_: list[str] = typer.Option([], "--set", help="scratch mode: config override ARCH.KEY=VALUE; repeatable."),
    fmt: str = format_option(),
    settings: dict = None, mutual: dict = None, data: dict = None, run: dict = None,
) -> None:
    """Deep mutual learning (arXiv 2406.12087): co-train N >= 2 members, each on BCE + w·mean squared gap to its peers;
    under torchrun, data-parallel over processes."""
    from ctr_ensemble.data.spec import FeatureSpec
    from ctr_ensemble.models import checkpoint
    from ctr_ensemble.training import mutual as dml
    from ctr_ensemble.training.distributed import on_processes
    from ctr_ensemble.training.loop import write_once

    _threads(run["threads"])
    mode = mode or ("finetune" if checkpoint_ else "scratch")
    if mode not in dml.MODES:
        raise CtrError(f"--mode must be one of {', '.join(dml.MODES)}, got {mode!r}")
    fs = FeatureSpec.load(spec) if spec is not None else None
    spec_from = str(spec)
    # Everything about the members is checked before any data is read or any step is taken.
    if mode == "finetune":
        if model or set_:
            raise CtrError("finetune mode takes --checkpoint files, not --model/--set")
        members, fs = dml.members_from_checkpoints(checkpoint_, fs)
        spec_from = spec_from if spec is not None else f"{checkpoint_[0]}'s"
    else:
        if checkpoint_:
            raise CtrError("scratch mode takes --model names, not --checkpoint (use --mode finetune)")
        if len(model) < 2:
            raise CtrError(f"mutual learning needs at least 2 members, got --model {model}")
        members = dml.members_from_archs(model, arch_overrides(set_))
    chosen = {**given(settings), **mutual}
    cfg = MutualConfig.finetune(**chosen) if mode == "finetune" else MutualConfig(**chosen)
    with _run(run, cfg.device) as dist:
        fs, tr, va = _training_data(train, val, fs, data["skip_bad_rows"], fmt, data["verify_shards"], spec_from)
        state = out_dir / "mutual.state.pt"
        cks = dml.train_mutual(members, fs, tr, va, cfg, history_csv=out_dir / "mutual.history.csv",
                               state_path=state, resume=run["resume"], dist=dist)
        write_once(dist, state, lambda: [checkpoint.save(ck, out_dir / f"{ck.name}.pt") for ck in cks])
    if dist.is_main:
        for ck in cks:
            typer.echo(f"{out_dir / (ck.name + '.pt')}: {ck.name} ({ck.arch}) val AUC {ck.metrics['val_auc']:.4f} "
                       f"at epoch {ck.metrics['best_epoch']}{on_processes(dist)}")


@app.command("train-collab")
@config_options(TrainConfig)
@config_options(CollabConfig, only=("kl_weight", "member_weight", "detach_head", "freeze_members"), dest="collab")
@config_options(HeadConfig, skip=("hidden",), dest="head")
@config_options(DataOptions, dest="data")
@config_options(RunOptions, dest="run")
def train_collab_cmd(
    model: list[str] = typer.Option(..., help="A member architecture; repeat (N >= 2; the paper's pair: dhen, interformer)."),
    train: Path = typer.Option(..., help=TRAIN_DATA_HELP),
    val: Path = typer.Option(..., help="Validation data (raw file or prepared folder); model selection on the fused val "
                                       "metric (--select)."),
    out: Path = typer.Option(..., help="Collaborative checkpoint to write (.pt + .sha256)."),
    head_hidden: str = typer.Option("64", help="Hidden widths of the head MLP, comma-separated ('' = linear head)."),
    set_: list[str] = typer.Option([], "--set", help="Member config override ARCH.KEY=VALUE; repeatable."),
    members_out: Optional[Path] = typer.Option(None, help="Also write each member as an ordinary checkpoint in this folder."),
    fmt: str = format_option(),
    settings: dict = None, collab: dict = None, head: dict = None, data: dict = None, run: dict = None,
) -> None:
    """Collaborative ensemble (CETNet, arXiv 2411.13700): members + confidence-weighted head trained jointly;
    under torchrun, data-parallel over processes."""
    from ctr_ensemble.models import checkpoint, ensemble
    from ctr_ensemble.training import collab as cet
    from ctr_ensemble.training import mutual as dml
    from ctr_ensemble.training.distributed import on_processes
    from ctr_ensemble.training.loop import write_once

    _threads(run["threads"])
    if len(model) < 2:
        raise CtrError(f"a collaborative ensemble needs at least 2 members, got --model {model}")
    try:
        hidden = [int(h) for h in split_list(head_hidden)]
    except ValueError as e:
        raise CtrError(f"--head-hidden expects comma-separated integers, got {head_hidden!r}") from e
    members = dml.members_from_archs(model, arch_overrides(set_))
    cfg = CollabConfig(**settings, **collab, head=HeadConfig(**head, hidden=hidden))

    def write(ck: ensemble.CollabCheckpoint) -> None:
        ensemble.save(ck, out)
        for m in ck.members if members_out is not None else ():
            checkpoint.save(m, members_out / f"{m.name}.pt")

    with _run(run, cfg.device) as dist:
        fs, tr, va = _training_data(train, val, data["spec"], data["skip_bad_rows"], fmt, data["verify_shards"])
        state = out.with_suffix(".state.pt")
        ck = cet.train_collab(members, fs, tr, va, cfg, history_csv=out.with_suffix(".history.csv"),
                              state_path=state, resume=run["resume"], dist=dist)
        write_once(dist, state, lambda: write(ck))
    if dist.is_main:
        per_member = ", ".join(f"{m.name} {m.metrics['val_auc']:.4f}" for m in ck.members)
        typer.echo(f"{out}: collaborative ensemble of {', '.join(ck.names)}: fused val AUC {ck.metrics['val_auc']:.4f} "
                   f"(members: {per_member}) at epoch {ck.metrics['best_epoch']}{on_processes(dist)}")
