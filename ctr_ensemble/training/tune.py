"""``ctr-ensemble tune``: hyperparameter search over one member with Optuna (TPE + median pruning).

Each trial samples a model config and TrainConfig values from the search space (``search_space.py``),
trains the member with ``train_member`` and reports every epoch's validation AUC to the pruner
(``on_epoch``); a pruned trial stops there (``optuna.TrialPruned`` propagates out of the training loop).
The objective is the trial's best validation AUC, or with ``select="logloss"`` (``--select``) its lowest validation
logloss (early stopping as in ``train``, on the same metric).

The study lives in an Optuna storage (default ``sqlite:///OUT/study.db``): running the same command
again continues it, and the trials already complete or pruned count toward ``trials``. A trial that
fails with a ``CtrError`` (a config the member refuses, a non-finite loss) is recorded as failed and the
search goes on; failed trials do not count. The sampler's seed is ``seed + trials in the study``, so a
resumed study does not repeat the random start-up points of the first run.

Outputs in ``out``: ``best.yaml`` (``train --config`` reads it), ``best.pt`` (the best trial's own
checkpoint, saved when that trial finished), ``trials.csv``, ``history.png`` (optimisation history),
``importance.png`` (parameter importances, fANOVA) and ``summary.json``; with test rows, the summary
also holds the test AUC / logloss of ``best.pt`` and of the untuned default config (``default.pt``).
"""

from __future__ import annotations

import csv
import json
import logging
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from ctr_ensemble import metrics, models
from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.errors import CtrError
from ctr_ensemble.models import checkpoint
from ctr_ensemble.training import run_config
from ctr_ensemble.training.distributed import Dist
from ctr_ensemble.training.search_space import SearchSpace
from ctr_ensemble.training.config import TrainConfig
from ctr_ensemble.training.member import train_member
from ctr_ensemble.training.step import evaluate_rows

# TrainConfig fields that decide the trained model (best.yaml's `train:` section); the rest is the machine's.
RESULT_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "patience", "plateau_factor", "min_lr", "lr_decay",
               "seed", "optimizer", "emb_lr", "embedding_reg_rows", "select")
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
DIRECTION = {"auc": "maximize", "logloss": "minimize"}  # Optuna's direction per TrainConfig.select
METRIC_LABEL = {"auc": "AUC", "logloss": "logloss"}


@dataclass
class TuneOptions:
    trials: int = 20  # complete + pruned trials the study should have (resumed ones count)
    timeout: float | None = None  # seconds after which no new trial starts (this run)
    storage: str | None = None  # Optuna storage URL; default sqlite:///OUT/study.db
    study_name: str | None = None  # default tune-<arch>
    seed: int = 42  # the sampler's (and the trials' TrainConfig seed unless the space sets it)
    prune_startup_trials: int = 5  # MedianPruner: trials that finish unpruned before pruning starts
    # MedianPruner: the first epoch at which a trial can be pruned. 3, not 1: strongly regularised configs (the
    # defaults among them) start slower and overtake later; pruning at epoch 1 on the MovieLens task removed them.
    prune_from_epoch: int = 3
    enqueue_default: bool = True  # a new study's first trial is the member's defaults (when inside the space)
    # after the search, retrain the best trial's and the default config on train + val for their own best epoch
    # count and test those too (summary.json test.refit): the period nearest the test is then in training
    refit: bool = False


@dataclass
class TuneResult:
    study: optuna.Study
    best: optuna.trial.FrozenTrial | None
    paths: dict[str, Path] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


def _storage(url: str):
    try:
        with warnings.catch_warnings():  # the heartbeat (a killed run's trial turns FAIL) is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
    except Exception as e:  # sqlalchemy's errors for a malformed URL or an unreachable database
        raise CtrError(f"--storage {url}: cannot open the Optuna storage: {str(e).splitlines()[0]}") from e


def _setup(arch: str, space: SearchSpace, spec: FeatureSpec, train, val, base: TrainConfig) -> dict:
    """What a resumed study must share with the run that created it (else its trials are not comparable)."""
    return {"arch": arch, "space": space.describe(), "spec": spec.fingerprint(), "train_rows": len(train),
            "val_rows": len(val), "train": result_settings(asdict(base))}


def open_study(arch: str, setup: dict, out: Path, opts: TuneOptions, pruner=None, select: str = "auc") -> optuna.Study:
    out.mkdir(parents=True, exist_ok=True)
    url = opts.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    name = opts.study_name or f"tune-{arch}"
    pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=opts.prune_startup_trials,
                                                   n_warmup_steps=opts.prune_from_epoch)
    direction = DIRECTION[select]
    study = optuna.create_study(storage=_storage(url), study_name=name, direction=direction, pruner=pruner,
                                load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise CtrError(f"study {name!r} in {url} {study.direction.name.lower()}s its objective, this run would "
                       f"{direction} the val {select} (--select); use another --study-name")
    old = study.user_attrs.get("setup")
    if old is None:
        study.set_user_attr("setup", setup)
    elif old != setup:
        diff = sorted(k for k in set(old) | set(setup) if old.get(k) != setup.get(k))
        raise CtrError(f"study {name!r} in {url} was started with other settings (differs in: {', '.join(diff)}); "
                       "resume with the same model, data, search space and --epochs/--seed, or use another "
                       "--study-name")
    study.sampler = optuna.samplers.TPESampler(seed=opts.seed + len(study.trials))
    return study


def _best_value(study: optuna.Study) -> float | None:
    """The best complete trial's value (AUC or logloss, by the study's direction), None before any."""
    values = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not values:
        return None
    return max(values) if study.direction == optuna.study.StudyDirection.MAXIMIZE else min(values)


def _better(study: optuna.Study, value: float) -> bool:
    best = _best_value(study)
    return best is None or (value > best if study.direction == optuna.study.StudyDirection.MAXIMIZE else value < best)


def _describe(values: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def run(arch: str, spec: FeatureSpec, train, val, base: TrainConfig, out: Path, space: SearchSpace,
        opts: TuneOptions, test=None, pruner=None, echo=tqdm.write) -> TuneResult:
    """Run (or continue) the study and write the outputs; ``test``: rows for the summary's test metrics."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours (progress below)
    study = open_study(arch, _setup(arch, space, spec, train, val, base), out, opts, pruner, base.select)
    key, label = f"val_{base.select}", f"val {METRIC_LABEL[base.select]}"
    if opts.enqueue_default and not study.trials:
        # The defaults are trial 0: the search starts from a known-good point, and the best trial is then at
        # least the defaults on validation.
        fixed_model, fixed_train = space.fixed()
        params = space.stored(asdict(models.make_config(arch, fixed_model)), asdict(replace(base, **fixed_train)))
        if params is not None:
            study.enqueue_trial(params, user_attrs={"enqueued": "defaults"})
        else:
            echo("the member's defaults lie outside the search space: not enqueued as trial 0")
    best_pt = out / "best.pt"
    searched = [p.key for p in space.searched]

    def objective(trial: optuna.Trial) -> float:
        model_over, train_over = space.suggest(trial)
        trial.set_user_attr("values", {k: v for k, v in {**model_over, **train_over}.items() if k in searched})
        echo(f"trial {trial.number}: {_describe(trial.user_attrs['values'])}")

        def on_epoch(epoch: int, row: dict) -> None:
            trial.set_user_attr("epochs", epoch)
            trial.report(row[key], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: {label} {row[key]:.4f} worse than the median")

        try:
            ck = train_member(arch, arch, models.make_config(arch, model_over), spec, train, val,
                              replace(base, **train_over), on_epoch=on_epoch)
        except CtrError as e:
            trial.set_user_attr("error", str(e))
            raise
        value = ck.metrics[key]
        trial.set_user_attr("best_epoch", ck.metrics["best_epoch"])
        trial.set_user_attr("val_auc", ck.metrics["val_auc"])
        trial.set_user_attr("val_logloss", ck.metrics["val_logloss"])
        if _better(study, value):  # the best so far: keep its checkpoint
            ck.metrics["tune"] = {"study": study.study_name, "trial": trial.number}
            checkpoint.save(ck, best_pt)
        return value

    def progress(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        a = t.user_attrs
        what = (f"{label} {t.value:.4f} (best epoch {a.get('best_epoch')})" if t.state == TrialState.COMPLETE else
                f"failed: {a.get('error', 'see the log above')}" if t.state == TrialState.FAIL else t.state.name.lower())
        best = _best_value(study)
        best_desc = f"; best so far {best:.4f} (trial {study.best_trial.number})" if best is not None else ""
        secs = t.duration.total_seconds() if t.duration else 0.0
        echo(f"trial {t.number} {what} after {a.get('epochs', 0)} epoch(s), "
             f"{secs:.1f}s{best_desc} [{len(study.get_trials(deepcopy=False, states=DONE))}/{opts.trials}]")

    done = len(study.get_trials(deepcopy=False, states=DONE))
    remaining = max(0, opts.trials - done)
    echo(f"study {study.study_name!r}: {done} trial(s) done, {remaining} to run ({len(searched)} parameters: "
         f"{', '.join(searched)}; space {space.source})")
    try:
        if remaining:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.optimize(objective, n_trials=remaining, timeout=opts.timeout, callbacks=[progress],
                               catch=(CtrError,), gc_after_trial=False)
    except KeyboardInterrupt:
        echo("interrupted: writing the outputs of the trials so far (run the same command again to continue)")
        write_outputs(study, arch, space, base, out, opts)
        raise
    return write_outputs(study, arch, space, base, out, opts, spec=spec, train=train, val=val, test=test, echo=echo)


def best_config(trial: optuna.trial.FrozenTrial, space: SearchSpace, base: TrainConfig) -> tuple[dict, dict]:
    """(model overrides, TrainConfig values) of ``trial``: its stored parameters through the space again."""
    model_over, train_over = space.suggest(optuna.trial.FixedTrial(trial.params, trial.number))
    return model_over, {**result_settings(asdict(base)), **train_over}


def result_settings(train_config: dict) -> dict:
    """The TrainConfig values (a dict of its fields) that decide the trained model: ``RESULT_KEYS``."""
    return {k: v for k, v in train_config.items() if k in RESULT_KEYS}


def write_outputs(study: optuna.Study, arch: str, space: SearchSpace, base: TrainConfig, out: Path, opts: TuneOptions,
                  spec=None, train=None, val=None, test=None, echo=tqdm.write) -> TuneResult:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    res = TuneResult(study, best)
    res.paths["trials"] = write_trials(trials, space, out / "trials.csv")
    res.paths.update(plot(study, out, opts.seed))
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    res.summary = {"study": study.study_name, "arch": arch, "trials": counts, "space": space.source}
    if best is None:
        echo("no trial has completed yet: no best.yaml")
    else:
        model_over, train_vals = best_config(best, space, base)
        res.paths["best_yaml"] = run_config.write(
            out / "best.yaml", arch, model_over, train_vals,
            f"ctr-ensemble tune: best trial {best.number} of study {study.study_name!r}, "
            f"val {METRIC_LABEL[base.select]} {best.value:.6f}\n"
            f"reproduce: ctr-ensemble train --model {arch} --config best.yaml --train ... --val ... --out ...")
        # val_auc/val_logloss of the best epoch (trials of older runs stored only their value: the AUC)
        res.summary["best"] = {"trial": best.number, "select": base.select,
                               "val_auc": best.user_attrs.get("val_auc", best.value if base.select == "auc" else None),
                               "val_logloss": best.user_attrs.get("val_logloss"),
                               "best_epoch": best.user_attrs.get("best_epoch"),
                               "epochs": best.user_attrs.get("epochs"), "model": model_over, "train": train_vals}
        if test is not None:
            res.summary["test"] = test_summary(study, best, arch, space, base, out, spec, train, val, test, echo,
                                               refit=opts.refit)
    res.paths["summary"] = out / "summary.json"
    res.paths["summary"].write_text(json.dumps(res.summary, indent=2, default=str))
    return res


def write_trials(trials: list, space: SearchSpace, path: Path) -> Path:
    """One row per trial: number, state, value, epochs run, best epoch, seconds, each searched value, error."""
    keys = [p.key for p in space.searched]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "state", "value", "epochs", "best_epoch", "duration_s", *keys, "error"])
        for t in trials:
            a, vals = t.user_attrs, t.user_attrs.get("values", {})
            w.writerow([t.number, t.state.name, "" if t.value is None else t.value, a.get("epochs", 0),
                        a.get("best_epoch", ""), f"{t.duration.total_seconds():.2f}" if t.duration else "",
                        *(json.dumps(vals[k]) if isinstance(vals.get(k), list) else vals.get(k, "") for k in keys),
                        a.get("error", "")])
    return path


def plot(study: optuna.Study, out: Path, seed: int) -> dict[str, Path]:
    """``history.png`` (optimisation history) and ``importance.png`` (fANOVA importances; a note in the
    picture while they cannot be computed yet: fewer than 2 complete trials, or no parameter that varied)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    paths = {"history": out / "history.png", "importance": out / "importance.png"}
    # Optuna's matplotlib plots are marked experimental; its logger warns about empty studies.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("optuna").setLevel(logging.ERROR)
        try:
            ax = ovm.plot_optimization_history(study, target_name="val AUC")
            _save(ax.figure, paths["history"])
            try:
                ev = optuna.importance.FanovaImportanceEvaluator(seed=seed)
                ax = ovm.plot_param_importances(study, evaluator=ev)
                ax.figure.set_size_inches(7, 4)
            except (ValueError, RuntimeError, ZeroDivisionError) as e:
                fig, ax = plt.subplots(figsize=(7, 4))
                ax.axis("off")
                ax.text(0.5, 0.5, f"parameter importances not available yet:\n{e}", ha="center", va="center", wrap=True)
            if not ax.has_data() and not ax.texts:
                ax.text(0.5, 0.5, "parameter importances not available yet", ha="center", va="center",
                        transform=ax.transAxes)
            _save(ax.figure, paths["importance"])
        finally:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
    return paths


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _test_metrics(ck: checkpoint.Checkpoint, test, spec: FeatureSpec, batch_size: int) -> dict:
    y, p = evaluate_rows(ck.build(), test, spec, batch_size, Dist())
    return {"test_auc": metrics.auc(y, p), "test_logloss": metrics.logloss(y, p), "val_auc": ck.metrics["val_auc"],
            "val_logloss": ck.metrics.get("val_logloss")}


def _trained(path: Path, tag: dict, arch: str, model_over: dict, cfg: TrainConfig, spec, train, val,
             echo, lr_schedule: list[float] | None = None) -> tuple[checkpoint.Checkpoint, bool]:
    """(checkpoint, kept): the one at ``path`` if its metrics carry ``tag``, else trained now and saved there."""
    if path.is_file():
        ck = checkpoint.load(path)
        if ck.metrics.get("tune") == tag:
            return ck, True
    echo(f"training {path.name} ({_describe(model_over) or 'the registry defaults'})")
    ck = train_member(arch, arch, models.make_config(arch, model_over), spec, train, val, cfg, lr_schedule=lr_schedule)
    ck.metrics["tune"] = tag
    checkpoint.save(ck, path)
    return ck, False


def test_summary(study, best, arch: str, space: SearchSpace, base: TrainConfig, out: Path, spec, train, val, test,
                 echo, refit: bool = False) -> dict:
    """Test metrics of the best trial's checkpoint (kept from the trial; retrained only when ``best.pt`` is
    missing or from another trial) and of the default config (registry defaults + the space's fixed values);
    with ``refit``, also of both configs retrained on train + val (``refit_summary``)."""
    model_over, train_vals = best_config(best, space, base)
    tag = {"study": study.study_name, "trial": best.number}
    best_ck, kept = _trained(out / "best.pt", tag, arch, model_over, replace(base, **train_vals), spec, train, val, echo)
    fixed_model, fixed_train = space.fixed()
    default_cfg = replace(base, **fixed_train)
    default_tag = {"study": study.study_name, "default": True, "model": fixed_model,
                   "train": result_settings(asdict(default_cfg))}
    default_ck, _ = _trained(out / "default.pt", default_tag, arch, fixed_model, default_cfg, spec, train, val, echo)
    b = _test_metrics(best_ck, test, spec, base.eval_batch_size)
    d = _test_metrics(default_ck, test, spec, base.eval_batch_size)
    gain = b["test_auc"] - d["test_auc"] if b["test_auc"] is not None and d["test_auc"] is not None else None
    echo(f"test AUC / logloss: best trial {b['test_auc']:.4f} / {b['test_logloss']:.4f}, default config "
         f"{d['test_auc']:.4f} / {d['test_logloss']:.4f}" if gain is not None else
         "test AUC undefined (one class in the test rows)")
    res = {"best": {**b, "checkpoint": "best.pt", "source": f"trial {best.number}" if kept else "retrained"},
           "default": {**d, "checkpoint": "default.pt", "model": fixed_model,
                       "config": "the registry's defaults with the space's fixed values"}, "test_auc_gain": gain}
    if refit:
        res["refit"] = refit_summary({"best": (best_ck, model_over, tag), "default": (default_ck, fixed_model, default_tag)},
                                     arch, base, out, spec, train, val, test, echo)
    return res


def refit_summary(runs: dict, arch: str, base: TrainConfig, out: Path, spec, train, val, test, echo) -> dict:
    """Retrain each of ``runs`` (name -> (checkpoint, model overrides, tag)) on train + val for exactly its
    checkpoint's best epoch count, with its own TrainConfig and the learning rate it had in each of those epochs
    (the reductions on plateau that validation decided are replayed), and score it on test (``<name>-refit.pt``).

    The usual protocol after a search: validation chose the config and the epoch count; the refit then also
    learns from the validation period, the one nearest the test on a time split. No early stopping can fire
    (patience = epochs); val rows are still scored each epoch (they are training rows now), so the weights
    kept are those of the epoch that fits them best, almost always the last."""
    from ctr_ensemble.data.encode import Arrays

    if not (isinstance(train, Arrays) and isinstance(val, Arrays)):
        raise CtrError("--refit needs the train and val rows in memory (raw files), not prepared folders")
    both = Arrays.concat([train, val])
    res = {"rows": len(both)}
    for name, (ck, model_over, tag) in runs.items():
        epochs = int(ck.metrics["best_epoch"])
        cfg = replace(base, **{**result_settings(ck.metrics["train_config"]), "epochs": epochs, "patience": epochs})
        lrs = [row["lr"] for row in ck.metrics["history"][:epochs]]
        refit_ck, _ = _trained(out / f"{name}-refit.pt", {**tag, "refit": epochs, "lrs": lrs}, arch, model_over, cfg,
                               spec, both, val, echo, lr_schedule=lrs)
        res[name] = {**_test_metrics(refit_ck, test, spec, base.eval_batch_size), "epochs": epochs, "lrs": lrs,
                     "checkpoint": f"{name}-refit.pt"}
    a, b = res["best"]["test_auc"], res["default"]["test_auc"]
    res["test_auc_gain"] = a - b if a is not None and b is not None else None
    if res["test_auc_gain"] is not None:
        echo(f"refit on train + val ({len(both)} rows): test AUC best trial {a:.4f} ({res['best']['epochs']} epochs), "
             f"default config {b:.4f} ({res['default']['epochs']} epochs)")
    return res


def open_rows(path: Path, spec: FeatureSpec, skip_bad_rows: bool = False, fmt: str = "auto", verify: str = "size"):
    """Rows scored with ``spec``: a prepared folder (same spec required) or a raw file encoded into memory."""
    from ctr_ensemble.data.encode import encode_file
    from ctr_ensemble.data.prepared.shards import Prepared, is_prepared

    if not is_prepared(path):
        return encode_file(path, spec, skip_bad_rows, fmt)
    rows = Prepared(path, verify=verify)
    if rows.spec.fingerprint() != spec.fingerprint():
        raise CtrError(f"{path}: prepared with another feature spec than the training data's; prepare it with --spec")
    return rows
