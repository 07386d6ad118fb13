"""Regularizers (FuxiCTR semantics), BatchNorm towers, the training schedule, and FuxiCTR configs one to one."""

from __future__ import annotations

import dataclasses
import inspect
import math

import numpy as np
import pytest
import torch
from torch import nn

from ctr_ensemble import models
from ctr_ensemble.errors import CtrError
from ctr_ensemble.export.onnx_export import export_member, run_onnx, session
from ctr_ensemble.models import fuxictr
from ctr_ensemble.training import loop
from ctr_ensemble.training.regularize import Regularizer
from ctr_ensemble.training.config import TrainConfig
from ctr_ensemble.training.member import train_member
from ctr_ensemble.training.step import Optimizers
from tests.conftest import TINY_MODEL


def _member(spec, **over):
    torch.manual_seed(0)
    return models.build("deepfm", models.make_config("deepfm", {**TINY_MODEL["deepfm"], **over}), spec)


def test_all_rows_penalty_is_fuxictrs_sum(tiny_spec):
    m = _member(tiny_spec, embedding_regularizer=0.05, net_regularizer=1e-3)
    pen = Regularizer(m, "all", sparse_optimizer=False).penalty()
    tables = [mod.weight for mod in m.modules() if isinstance(mod, nn.Embedding)]
    assert len(tables) == 2  # field embeddings + first-order weights
    want = sum(0.05 / 2 * float((t.detach().double() ** 2).sum()) for t in tables)
    # net: every weight and bias of a non-Embedding module (FuxiCTR's named_parameters walk)
    for mod in m.modules():
        if not isinstance(mod, nn.Embedding):
            for name, p in mod.named_parameters(recurse=False):
                if name in ("weight", "bias"):
                    want += 1e-3 / 2 * float((p.double() ** 2).sum())
    assert float(pen) == pytest.approx(want, rel=1e-5)


def test_l1_norm_and_zero_strength(tiny_spec):
    m = _member(tiny_spec, embedding_regularizer=0.1, embedding_regularizer_p=1)
    pen = Regularizer(m, "all", False).penalty()
    tables = [mod.weight for mod in m.modules() if isinstance(mod, nn.Embedding)]
    assert float(pen) == pytest.approx(sum(0.1 * float(t.abs().sum()) for t in tables), rel=1e-5)
    assert Regularizer(_member(tiny_spec, embedding_regularizer=0.0), "all", False).penalty() is None
    with pytest.raises(CtrError, match="norms must be 1 or 2"):
        Regularizer(_member(tiny_spec, embedding_regularizer_p=3), "all", False)
    with pytest.raises(CtrError, match="embedding_reg_rows must be one of"):
        Regularizer(m, "some", False)


def test_batch_rows_penalty_counts_each_looked_up_row_once_and_stays_sparse(tiny_spec, tiny_arrays):
    m = _member(tiny_spec, embedding_regularizer=0.05).train()
    cfg = TrainConfig(optimizer="sparse_adam")
    opt = Optimizers(m, cfg)  # switches the tables to sparse gradients
    reg = Regularizer(m, "auto", sparse_optimizer=True)
    assert reg.rows == "batch"
    tr = tiny_arrays["train"]
    cat = torch.from_numpy(tr.cat_ids[:64])
    num = torch.from_numpy(tr.num[:64])
    m.logits(cat, num)
    pen = reg.penalty()
    table = m.embedding.table.weight
    ids = torch.unique(torch.where((cat >= 0) & (cat < m.embedding.sizes), cat, 0) + m.embedding.offsets)
    first = m.linear.table.weight
    want = 0.05 / 2 * (float((table[ids].double() ** 2).sum()) + float((first[ids].double() ** 2).sum()))
    assert float(pen) == pytest.approx(want, rel=1e-5)
    opt.zero_grad()
    pen.backward()
    assert table.grad.is_sparse and set(table.grad.coalesce().indices()[0].tolist()) == set(ids.tolist())
    assert reg.penalty() is None or float(reg.penalty()) == 0.0  # ids are consumed: nothing looked up since


@pytest.mark.parametrize("optimizer", ["adam", "sparse_adam"])
def test_training_logs_the_penalty_and_learns(optimizer, tiny_spec, tiny_arrays):
    cfg = TrainConfig(epochs=2, batch_size=256, seed=3, optimizer=optimizer)
    ck = train_member("deepfm", "deepfm", models.make_config("deepfm", {**TINY_MODEL["deepfm"], "batch_norm": True,
                                                                        "dropout": 0.1}),
                      tiny_spec, tiny_arrays["train"], tiny_arrays["val"], cfg)
    h = ck.metrics["history"]
    assert all(r["train_reg"] > 0 for r in h) and all(math.isfinite(r["train_logloss"]) for r in h)
    assert ck.metrics["val_auc"] > 0.6


def test_batch_norm_towers_export_with_parity(tiny_spec, tiny_arrays, tmp_path):
    for arch in sorted(models.REGISTRY):
        if "dropout" not in {f.name for f in dataclasses.fields(models.entry(arch).config)}:  # no MLP tower (lr)
            with pytest.raises(CtrError, match="batch_norm"):
                models.build(arch, models.make_config(arch, {**TINY_MODEL[arch], "batch_norm": True}), tiny_spec)
            continue
        cfg = models.make_config(arch, {**TINY_MODEL[arch], "batch_norm": True, "dropout": 0.2})
        assert any(isinstance(m, nn.BatchNorm1d) for m in models.build(arch, cfg, tiny_spec).modules()), arch
    ck = train_member("dcnv2", "dcnv2", models.make_config("dcnv2", {**TINY_MODEL["dcnv2"], "batch_norm": True}),
                      tiny_spec, tiny_arrays["train"], tiny_arrays["val"], TrainConfig(epochs=1, batch_size=256))
    model = models.build("dcnv2", ck.config, tiny_spec)
    model.load_state_dict(ck.state_dict)
    model.eval()
    path = export_member(model, tiny_spec, tmp_path / "m.onnx")
    feeds = tiny_arrays["test"].feeds(slice(0, 500))
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})[0][:, 0].numpy()
    got = run_onnx(session(path), feeds)[0]
    np.testing.assert_allclose(got.ravel(), ref, atol=1e-5)


class _Scripted:
    """A Task whose validation scores follow a script; records the lr at each evaluation."""

    def __init__(self, scores):
        self.scores, self.lrs = list(scores), []
        self.module = nn.Linear(2, 1)
        self.opt = torch.optim.Adam(self.module.parameters(), lr=1e-2)

    def task(self):
        def loss(idx):
            x = torch.ones(len(idx), 2)
            v = self.module(x).pow(2).mean()
            return v, {"loss": v}

        def evaluate():
            self.lrs.append(self.opt.param_groups[0]["lr"])
            s = self.scores.pop(0)
            return s, {"val_auc": s}

        return loop.Task("scripted", self.module, self.opt, loss, evaluate)


def test_schedule_patience_plateau_and_best_weights():
    s = _Scripted([0.6, 0.7, 0.69, 0.68, 0.9])
    seen = []
    res = loop.run(s.task(), 32, loop.LoopConfig(epochs=10, batch_size=8, patience=2, plateau_factor=0.1),
                   on_epoch=lambda e, row: seen.append((e, row["val_auc"], row["lr"])))
    # Stops after 2 epochs in a row without a better score; the best (epoch 2) is what comes back.
    assert [r["epoch"] for r in res.history] == [1, 2, 3, 4] and res.best_epoch == 2 and res.best_score == 0.7
    assert s.lrs == pytest.approx([1e-2, 1e-2, 1e-2, 1e-3])  # reduced after epoch 3, the first without a gain
    assert [e for e, _, _ in seen] == [1, 2, 3, 4]
    s2 = _Scripted([0.6, 0.5, 0.7, 0.6, 0.5])  # a gain after one bad epoch resets the wait
    res2 = loop.run(s2.task(), 32, loop.LoopConfig(epochs=10, batch_size=8, patience=2, plateau_factor=1.0))
    assert len(res2.history) == 5 and res2.best_epoch == 3 and s2.lrs == [1e-2] * 5
    with pytest.raises(CtrError, match="patience must be >= 1"):
        loop.run(_Scripted([0.5]).task(), 8, loop.LoopConfig(patience=0))
    with pytest.raises(CtrError, match="plateau_factor must be in"):
        loop.run(_Scripted([0.5]).task(), 8, loop.LoopConfig(plateau_factor=0.0))


@pytest.mark.parametrize("select", ["auc", "logloss"])
def test_select_picks_the_best_epoch_by_its_metric(select, tiny_spec, tiny_arrays):
    # lr 0.05 over-fits the tiny data within a few epochs, so the two metrics can disagree on the best epoch
    cfg = TrainConfig(epochs=4, batch_size=256, lr=0.05, patience=4, plateau_factor=1.0, seed=3, select=select)
    ck = train_member("deepfm", "deepfm", models.make_config("deepfm", TINY_MODEL["deepfm"]), tiny_spec,
                      tiny_arrays["train"].take(slice(0, 3000)), tiny_arrays["val"], cfg)
    h = ck.metrics["history"]
    pick = max(h, key=lambda r: r["val_auc"]) if select == "auc" else min(h, key=lambda r: r["val_logloss"])
    assert len(h) == 4 and ck.metrics["best_epoch"] == pick["epoch"] and ck.metrics["select"] == select
    assert (ck.metrics["val_auc"], ck.metrics["val_logloss"]) == (pick["val_auc"], pick["val_logloss"])
    with pytest.raises(CtrError, match="select must be one of auc, logloss"):
        train_member("deepfm", "deepfm", models.make_config("deepfm", TINY_MODEL["deepfm"]), tiny_spec,
                     tiny_arrays["train"], tiny_arrays["val"], dataclasses.replace(cfg, select="ne"))


def test_pruning_exception_from_on_epoch_stops_the_run():
    class Pruned(Exception):
        pass

    def prune(epoch, row):
        if epoch == 2:
            raise Pruned

    s = _Scripted([0.5, 0.6, 0.7])
    with pytest.raises(Pruned):
        loop.run(s.task(), 16, loop.LoopConfig(epochs=5, batch_size=8), on_epoch=prune)
    assert len(s.scores) == 1  # epoch 3 never ran


BARS_DEEPFM = {  # DeepFM_frappe_x1_001_4ae3a56e as BARS writes it (values as strings)
    "batch_norm": "True", "batch_size": "4096", "debug": "False", "embedding_dim": "10",
    "embedding_regularizer": "0.05", "epochs": "100", "every_x_epochs": "1", "gpu": "0",
    "hidden_activations": "relu", "hidden_units": "[400, 400, 400]", "learning_rate": "0.001",
    "loss": "binary_crossentropy", "metrics": "['AUC', 'logloss']", "model": "DeepFM",
    "model_id": "DeepFM_frappe_x1_001_4ae3a56e", "model_root": "./Frappe/DeepFM_frappe_x1/", "monitor": "AUC",
    "monitor_mode": "max", "net_dropout": "0.2", "net_regularizer": "0", "num_workers": "3", "optimizer": "adam",
    "patience": "2", "save_best_only": "True", "seed": "2021", "shuffle": "True", "task": "binary_classification",
    "verbose": "1", "version": "pytorch",
}


def test_bars_config_maps_one_to_one():
    arch, model, train = fuxictr.from_fuxictr(BARS_DEEPFM)
    assert arch == "deepfm"
    assert model == {"batch_norm": True, "embedding_dim": 10, "embedding_regularizer": 0.05,
                     "embedding_regularizer_p": 2, "hidden": [400, 400, 400], "dropout": 0.2, "net_regularizer": 0.0,
                     "net_regularizer_p": 2}
    assert train == {"batch_size": 4096, "epochs": 100, "lr": 1e-3, "patience": 2, "seed": 2021}
    cfg = models.make_config(arch, model)  # every mapped key is a field of the member config
    assert cfg.embedding_regularizer == 0.05 and cfg.batch_norm
    TrainConfig(**train)
    assert fuxictr.parse_regularizer("l1(1e-5)") == (1e-5, 1) and fuxictr.parse_regularizer(1e-8) == (1e-8, 2)
    arch, model, _ = fuxictr.from_fuxictr({"model": "DCNv2", "num_cross_layers": 4, "model_structure": "parallel",
                                           "parallel_dnn_hidden_units": [500, 500], "reduce_lr_on_plateau": False})
    assert arch == "dcnv2" and model == {"cross_layers": 4, "hidden": [500, 500]}


def test_fuxictr_keys_we_cannot_honour_are_named():
    with pytest.raises(CtrError, match="optimizer.*'sgd' is not supported"):
        fuxictr.from_fuxictr({"model": "DeepFM", "optimizer": "sgd"})
    with pytest.raises(CtrError, match="model_structure"):
        fuxictr.from_fuxictr({"model": "DCNv2", "model_structure": "stacked"})
    with pytest.raises(CtrError, match="no counterpart here: fancy_gate"):
        fuxictr.from_fuxictr({"model": "DeepFM", "fancy_gate": 1})
    with pytest.raises(CtrError, match="has no member here"):
        fuxictr.from_fuxictr({"model": "xDeepFM"})
    with pytest.raises(CtrError, match="2 experiments"):
        fuxictr.experiment({"a": {"model": "DeepFM"}, "b": {"model": "DCN"}})


def test_cli_training_options_are_the_config_fields():
    """Every TrainConfig field is an option of each training command, with the dataclass's default and help
    (generated once, cli/options.py): the commands cannot drift from the one place the defaults are chosen."""
    from typer.main import get_command

    from ctr_ensemble.cli import app
    from ctr_ensemble.cli.data import data_fit
    from ctr_ensemble.training.collab import CollabConfig, HeadConfig

    commands = get_command(app).commands
    d = TrainConfig()
    for name in ("train", "train-mutual", "train-collab"):
        params = {p.name: p for p in commands[name].params}
        for f in dataclasses.fields(TrainConfig):
            p = params[f.name]
            assert p.help == f.metadata["help"] and p.help, (name, f.name)
            mode_default = name == "train-mutual" and f.name in ("epochs", "lr", "lr_decay")
            assert p.default == (None if mode_default else getattr(d, f.name)), (name, f.name)
    tune = {p.name: p for p in commands["tune"].params}
    assert {"epochs", "seed", "device", "select"} <= set(tune) and "lr" not in tune
    collab = {p.name: p.default for p in commands["train-collab"].params}
    assert collab["member_weight"] == CollabConfig().member_weight and collab["tau"] == HeadConfig().tau
    from ctr_ensemble.data.fit import DEFAULT_MIN_COUNT
    from ctr_ensemble.data.prepared.prepare import PrepareOptions

    assert inspect.signature(data_fit).parameters["min_count"].default.default == DEFAULT_MIN_COUNT
    assert PrepareOptions().min_count == DEFAULT_MIN_COUNT


def test_train_takes_a_fuxictr_config(tiny_data, tmp_path):
    import subprocess
    import sys

    import yaml

    exp = {**BARS_DEEPFM, "embedding_dim": "4", "hidden_units": "[16]", "epochs": "1", "batch_size": "512"}
    (tmp_path / "model_config.yaml").write_text(yaml.safe_dump({"DeepFM_test": exp}))
    run = [sys.executable, "-m", "ctr_ensemble.cli"]
    subprocess.run([*run, "data", "fit", "--train", str(tiny_data / "train.tsv"), "--out", str(tmp_path / "spec.json")],
                   check=True, capture_output=True)
    r = subprocess.run([*run, "train", "--model", "deepfm", "--train", str(tiny_data / "train.tsv"), "--val",
                        str(tiny_data / "val.tsv"), "--spec", str(tmp_path / "spec.json"), "--out", str(tmp_path / "m.pt"),
                        "--fuxictr-config", str(tmp_path / "model_config.yaml"), "--threads", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    from ctr_ensemble.models import checkpoint

    ck = checkpoint.load(tmp_path / "m.pt")
    assert ck.config.embedding_regularizer == 0.05 and ck.config.batch_norm and ck.config.hidden == [16]
    assert ck.metrics["train_config"]["epochs"] == 1 and ck.metrics["train_config"]["lr"] == 1e-3
    r = subprocess.run([*run, "train", "--model", "dcnv2", "--train", "x", "--val", "y", "--spec", "z", "--out",
                        str(tmp_path / "n.pt"), "--fuxictr-config", str(tmp_path / "model_config.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "a FuxiCTR deepfm config, but --model is dcnv2" in r.stderr


def test_min_count_auto_resolves_on_the_training_rows(tiny_data):
    from ctr_ensemble.data.fit import fit, parse_min_count, resolve_min_count

    assert resolve_min_count("auto", 50_000) == 2 and resolve_min_count("auto", 45_000_000) == 10
    assert resolve_min_count(5, 45_000_000) == 5
    assert parse_min_count("auto") == "auto" and parse_min_count("3") == 3
    for bad in ("0", "many", "-1"):
        with pytest.raises(CtrError, match="min"):
            parse_min_count(bad)
    spec = fit(tiny_data / "train.tsv")
    assert spec.min_count == 2 and spec.fitted_on["min_count_rule"] == "auto"
    assert fit(tiny_data / "train.tsv", min_count=3).fitted_on.get("min_count_rule") is None
