"""`ctr-ensemble tune`: Optuna studies on the tiny data (tiny members, 1-2 epochs), search spaces, best.yaml."""

from __future__ import annotations

import csv
import dataclasses
import json

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from ctr_ensemble import models
from ctr_ensemble.cli import app
from ctr_ensemble.errors import CtrError
from ctr_ensemble.models import checkpoint
from ctr_ensemble.training import run_config, search_space, tune
from ctr_ensemble.training.config import TrainConfig

from .conftest import TINY_MODEL

# A tiny space: deepfm's tiny sizes fixed, a few parameters of each kind searched.
TINY_SPACE = {
    "model": {"embedding_dim": 4, "hidden": {"type": "categorical", "choices": [[16], [8, 8]]},
              "embedding_regularizer": {"type": "float", "low": "1e-4", "high": 1e-2, "log": True},
              "net_regularizer": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True, "zero": True},
              "dropout": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.1},
              "batch_norm": {"type": "categorical", "choices": [True, False]}},
    "train": {"lr": {"type": "float", "low": 1e-3, "high": 5e-3, "log": True},
              "batch_size": {"type": "categorical", "choices": [256, 512]}, "patience": 1},
}
BASE = TrainConfig(epochs=2, seed=3)
ROWS = {"train": 2000, "val": 1000, "test": 1000}  # of the tiny data: the machine is small and shared


@pytest.fixture(scope="module")
def rows(tiny_arrays):
    return {s: tiny_arrays[s].take(slice(0, n)) for s, n in ROWS.items()}


@pytest.fixture(scope="module")
def files(tiny_data, tmp_path_factory):
    """The first ROWS lines of the tiny data's TSV files."""
    out = tmp_path_factory.mktemp("tune_data")
    for s, n in ROWS.items():
        with open(tiny_data / f"{s}.tsv") as f:
            (out / f"{s}.tsv").write_text("".join(line for _, line in zip(range(n), f)))
    return out


def _space(tmp_path, obj=None, name="space.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(TINY_SPACE if obj is None else obj))
    return p


def _tune(tmp_path, tiny_spec, rows, trials, space=None, **kw):
    space = space or search_space.load("deepfm", _space(tmp_path))
    opts = tune.TuneOptions(trials=trials, seed=5, prune_startup_trials=kw.pop("startup", 5))
    return tune.run("deepfm", tiny_spec, rows["train"], rows["val"], kw.pop("base", BASE),
                    tmp_path / "out", space, opts, echo=lambda s: None, **kw)


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_study_writes_outputs_and_resumes(tmp_path, tiny_spec, rows):
    res = _tune(tmp_path, tiny_spec, rows, 3)
    out = tmp_path / "out"
    for f in ("best.yaml", "best.pt", "trials.csv", "history.png", "importance.png", "summary.json", "study.db"):
        assert (out / f).is_file(), f
    table = _csv(out / "trials.csv")
    assert [r["number"] for r in table] == ["0", "1", "2"] and {r["state"] for r in table} == {"COMPLETE"}
    assert {"lr", "batch_size", "hidden", "net_regularizer"} <= set(table[0]) and all(r["epochs"] in "12" for r in table)
    # Every epoch went to the pruner; best.pt is the best trial's own checkpoint.
    assert all(sorted(t.intermediate_values) == list(range(1, t.user_attrs["epochs"] + 1)) for t in res.study.trials)
    best = res.best
    assert best.value == max(t.value for t in res.study.trials)
    assert checkpoint.load(out / "best.pt").metrics["tune"] == {"study": "tune-deepfm", "trial": best.number}
    model_over, train_over = run_config.read(out / "best.yaml", "deepfm")
    assert model_over["embedding_dim"] == 4 and train_over["epochs"] == 2 and train_over["patience"] == 1
    assert train_over["lr"] == pytest.approx(best.params["lr"]) and models.make_config("deepfm", model_over)
    assert json.loads((out / "summary.json").read_text())["best"]["trial"] == best.number

    # The same storage again: the 3 trials count, 2 more run (not 5 from scratch).
    first = [t.params for t in res.study.trials]
    res2 = _tune(tmp_path, tiny_spec, rows, 5)
    assert [t.number for t in res2.study.trials] == [0, 1, 2, 3, 4]
    assert [t.params for t in res2.study.trials[:3]] == first
    assert len(_csv(out / "trials.csv")) == 5
    # Another search space on the same study is refused instead of mixing incomparable trials.
    other = search_space.load("deepfm", _space(tmp_path, {**TINY_SPACE, "train": {"lr": 1e-3}}, "other.yaml"))
    with pytest.raises(CtrError, match="differs in: space"):
        _tune(tmp_path, tiny_spec, rows, 6, space=other)


def test_select_logloss_minimises_the_val_logloss_and_refuses_a_maximising_study(tmp_path, tiny_spec, rows):
    res = _tune(tmp_path, tiny_spec, rows, 3, base=dataclasses.replace(BASE, select="logloss"))
    trials = res.study.trials
    assert res.study.direction == optuna.study.StudyDirection.MINIMIZE
    assert res.best.value == min(t.value for t in trials) == res.best.user_attrs["val_logloss"]
    # the value is the best epoch's val logloss: the lowest of the trial's per-epoch reports
    assert all(t.value == pytest.approx(min(t.intermediate_values.values())) for t in trials)
    best = json.loads((tmp_path / "out" / "summary.json").read_text())["best"]
    assert best["select"] == "logloss" and best["val_logloss"] == res.best.value and 0.5 < best["val_auc"] < 1
    ck = checkpoint.load(tmp_path / "out" / "best.pt")
    assert ck.metrics["select"] == "logloss" and ck.metrics["val_logloss"] == pytest.approx(res.best.value)
    assert run_config.read(tmp_path / "out" / "best.yaml", "deepfm")[1]["select"] == "logloss"
    with pytest.raises(CtrError, match="minimizes its objective.*maximize the val auc"):
        _tune(tmp_path, tiny_spec, rows, 4)


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_pruner_stops_trials_after_their_first_epoch(tmp_path, tiny_spec, rows):
    res = _tune(tmp_path, tiny_spec, rows, 2, pruner=AlwaysPrune(), base=TrainConfig(epochs=3, seed=3))
    assert [t.state for t in res.study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    assert all(list(t.intermediate_values) == [1] for t in res.study.trials)
    table = _csv(tmp_path / "out" / "trials.csv")
    assert [(r["state"], r["epochs"]) for r in table] == [("PRUNED", "1")] * 2
    assert res.best is None and not (tmp_path / "out" / "best.yaml").exists()
    assert (tmp_path / "out" / "importance.png").is_file()  # a note in the picture until trials complete


def test_failed_trials_are_recorded_and_do_not_count(tmp_path, tiny_spec, rows):
    space = search_space.load("deepfm", _space(tmp_path, {**TINY_SPACE, "train": {**TINY_SPACE["train"], "optimizer": "sgd"}}))
    res = _tune(tmp_path, tiny_spec, rows, 2, space=space)
    assert [t.state for t in res.study.trials] == [optuna.trial.TrialState.FAIL] * 2 and res.best is None
    assert all("optimizer must be one of" in r["error"] for r in _csv(tmp_path / "out" / "trials.csv"))
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["trials"]["fail"] == 2


@pytest.mark.parametrize("section, key, spec, needles", [
    ("model", "hiden", [16], ["model", "'hiden'"]),
    ("train", "learning_rate", 1e-3, ["train", "'learning_rate'", "lr"]),
    ("model", "batch_norm", {"type": "categorical", "choices": [0.5]}, ["model.batch_norm", "not a bool"]),
    ("model", "dropout", {"type": "floaty", "low": 0, "high": 1}, ["model.dropout", "floaty"]),
    ("train", "lr", {"type": "float", "low": 0.1, "high": 0.01}, ["train.lr", "low < high"]),
    ("train", "lr", {"type": "float", "low": 0.0, "high": 0.01, "log": True}, ["train.lr", "low > 0"]),
    ("model", "embedding_dim", {"type": "float", "low": 4, "high": 8}, ["model.embedding_dim", "type: int"]),
    ("model", "hidden", {"type": "categorical", "choices": [["a"]]}, ["model.hidden", "list[int]"]),
    ("train", "batch_size", {"type": "int", "low": 64, "high": 512, "stride": 64}, ["train.batch_size", "stride"]),
])
def test_bad_search_space_names_file_and_key(tmp_path, section, key, spec, needles):
    obj = {"model": dict(TINY_SPACE["model"]), "train": dict(TINY_SPACE["train"])}
    obj[section][key] = spec
    p = _space(tmp_path, obj, "bad_space.yaml")
    with pytest.raises(CtrError) as e:
        search_space.load("deepfm", p)
    for n in ["bad_space.yaml", *needles]:
        assert n in str(e.value), (n, str(e.value))


def test_shipped_spaces_fit_every_member(tiny_spec):
    for i, arch in enumerate(models.REGISTRY):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=i))
        space = search_space.load(arch)
        tower = {"dropout", "hidden"} & {f.name for f in dataclasses.fields(models.entry(arch).config)}  # none for lr
        assert {"embedding_regularizer", "net_regularizer", "lr", *tower} <= {p.key for p in space.searched}
        model_over, train_over = space.suggest(study.ask())
        cfg = models.make_config(arch, {**model_over, **{k: v for k, v in TINY_MODEL[arch].items() if k != "embedding_dim"}})
        models.build(arch, cfg, tiny_spec)
        TrainConfig(**train_over)


def test_train_config_layouts(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("hidden: [16]\ndropout: 0.1\n")
    assert run_config.read(flat, "deepfm") == ({"hidden": [16], "dropout": 0.1}, {})
    sec = tmp_path / "sec.yaml"
    sec.write_text("arch: deepfm\nmodel: {hidden: [16]}\ntrain: {lr: 1e-3, batch_size: 256}\n")
    assert run_config.read(sec, "deepfm") == ({"hidden": [16]}, {"lr": 1e-3, "batch_size": 256})
    with pytest.raises(CtrError, match="sec.yaml.*'deepfm', not 'dcnv2'"):
        run_config.read(sec, "dcnv2")
    sec.write_text("model: {hidden: [16]}\ntrain: {lr: 1e-3, epoch: 3}\n")
    with pytest.raises(CtrError, match="sec.yaml: train: unknown TrainConfig key.*'epoch'"):
        run_config.read(sec, "deepfm")


def test_cli_tune_with_test_then_train_from_best_yaml(tmp_path, files, tiny_spec):
    spec = tiny_spec.save(tmp_path / "spec.json") or tmp_path / "spec.json"
    space = {**TINY_SPACE, "model": {**TINY_SPACE["model"], "hidden": [16]}}
    out = tmp_path / "tuned"
    runner = CliRunner()
    r = runner.invoke(app, ["tune", "--model", "deepfm", "--train", files / "train.tsv", "--val", files / "val.tsv",
                            "--test", files / "test.tsv", "--spec", spec, "--out", out, "--trials", "2", "--epochs", "1",
                            "--space", _space(tmp_path, space), "--threads", "2"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "trial 1 " in r.output and "best so far" in r.output
    summary = json.loads((out / "summary.json").read_text())
    t = summary["test"]
    assert t["best"]["source"] == f"trial {summary['best']['trial']}" and 0.5 < t["best"]["test_auc"] <= 1
    assert 0.5 < t["default"]["test_auc"] <= 1 and t["default"]["model"] == {"embedding_dim": 4, "hidden": [16]}
    r = runner.invoke(app, ["train", "--model", "deepfm", "--config", out / "best.yaml", "--train", files / "train.tsv",
                            "--val", files / "val.tsv", "--spec", spec, "--out", tmp_path / "m.pt", "--epochs", "5"])
    assert r.exit_code == 0, (r.output, r.exception)
    ck = checkpoint.load(tmp_path / "m.pt")
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert ck.metrics["train_config"]["epochs"] == 1 and ck.metrics["train_config"]["lr"] == best["train"]["lr"]
    assert ck.config.dropout == best["model"]["dropout"]
    # Same data, seed and settings: train --config best.yaml reproduces the best trial.
    assert ck.metrics["val_auc"] == pytest.approx(summary["best"]["val_auc"], abs=1e-6)


def test_a_new_study_starts_from_the_members_defaults(tmp_path, tiny_spec, rows):
    space_obj = {"model": {"embedding_dim": 4, "hidden": {"type": "categorical", "choices": [[16], [256, 128]]},
                           "embedding_regularizer": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
                           "net_regularizer": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True, "zero": True}},
                 "train": {"lr": {"type": "float", "low": 1e-3, "high": 5e-3, "log": True}, "patience": 1}}
    space = search_space.load("deepfm", _space(tmp_path, space_obj))
    res = _tune(tmp_path, tiny_spec, rows, 1, space=space)
    t0 = res.study.trials[0]
    d = models.make_config("deepfm")
    assert t0.user_attrs["enqueued"] == "defaults"
    assert t0.user_attrs["values"] == {"hidden": d.hidden, "embedding_regularizer": d.embedding_regularizer,
                                       "net_regularizer": 0.0, "lr": TrainConfig().lr}
    # A default outside the space is not enqueued (here lr 2e-3 above the range): the study just samples.
    narrow = search_space.load("deepfm", _space(tmp_path, {**space_obj, "train": {"lr": {
        "type": "float", "low": 1e-4, "high": 1e-3, "log": True}}}, "narrow.yaml"))
    assert narrow.stored(dataclasses.asdict(d), dataclasses.asdict(TrainConfig())) is None


def test_refit_retrains_best_and_default_on_train_plus_val_for_their_best_epochs(tmp_path, tiny_spec, rows):
    space = search_space.load("deepfm", _space(tmp_path))
    opts = tune.TuneOptions(trials=2, seed=5, refit=True)
    res = tune.run("deepfm", tiny_spec, rows["train"], rows["val"], BASE, tmp_path / "out", space, opts,
                   test=rows["test"], echo=lambda s: None)
    refit = res.summary["test"]["refit"]
    assert refit["rows"] == ROWS["train"] + ROWS["val"]
    for name in ("best", "default"):
        kept = checkpoint.load(tmp_path / "out" / f"{name}.pt")
        again = checkpoint.load(tmp_path / "out" / f"{name}-refit.pt")
        assert refit[name]["epochs"] == kept.metrics["best_epoch"] == again.metrics["train_config"]["epochs"]
        assert again.metrics["train_config"]["lr"] == kept.metrics["train_config"]["lr"]
        # the learning rate of every epoch is replayed, reductions on plateau included
        assert [r["lr"] for r in again.metrics["history"]] == [r["lr"] for r in kept.metrics["history"][:refit[name]["epochs"]]]
        assert 0.5 < refit[name]["test_auc"] <= 1
        # more rows, same seed and settings: other weights than the trial's own
        assert any((a != b).any() for a, b in zip(kept.state_dict.values(), again.state_dict.values()))
    assert refit["test_auc_gain"] == pytest.approx(refit["best"]["test_auc"] - refit["default"]["test_auc"])


def test_refit_needs_test_rows(tmp_path, files, tiny_spec):
    spec = tiny_spec.save(tmp_path / "spec.json") or tmp_path / "spec.json"
    r = CliRunner().invoke(app, ["tune", "--model", "deepfm", "--train", files / "train.tsv", "--val",
                                 files / "val.tsv", "--spec", spec, "--out", tmp_path / "o", "--refit"])
    assert r.exit_code != 0 and "--refit needs --test" in r.output


def test_an_lr_schedule_is_replayed_and_must_cover_every_epoch(tiny_spec, rows):
    from ctr_ensemble.training.member import train_member

    cfg = dataclasses.replace(BASE, epochs=3, patience=3)
    ck = train_member("deepfm", "deepfm", models.make_config("deepfm", TINY_MODEL["deepfm"]), tiny_spec,
                      rows["train"], rows["val"], cfg, lr_schedule=[2e-3, 5e-4, 1e-4])
    assert [r["lr"] for r in ck.metrics["history"]] == pytest.approx([2e-3, 5e-4, 1e-4])
    with pytest.raises(CtrError, match="one lr per epoch"):
        train_member("deepfm", "deepfm", models.make_config("deepfm", TINY_MODEL["deepfm"]), tiny_spec,
                     rows["train"], rows["val"], cfg, lr_schedule=[1e-3])
