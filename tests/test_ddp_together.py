"""Mutual learning and the collaborative ensemble under torchrun (DDP, 2 gloo processes on the CPU).

Each test runs the real CLI twice, as ``torchrun --nproc-per-node 2`` and as one process with ``--streams 2``
(the same global batches), and compares the checkpoints: same weights up to float summation order, same val
AUC, written once by rank 0. A dead worker is not tested again here: these trainers run the same
``loop.run`` step under ``distributed.collective`` as ``train`` (tests/test_scale.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctr_ensemble.data.prepared.shards import Prepared
from ctr_ensemble.errors import CtrError
from ctr_ensemble.serving.server import free_port
from ctr_ensemble.models import checkpoint
from ctr_ensemble.models import ensemble
from ctr_ensemble.training import collab, mutual
from ctr_ensemble.training.distributed import Dist

from .conftest import TINY_MODEL

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
TINY_SETS = ["--set", "deepfm.embedding_dim=4", "--set", "deepfm.hidden=[16]", "--set", "dcnv2.embedding_dim=4",
             "--set", "dcnv2.hidden=[16]", "--set", "dcnv2.cross_layers=2"]
COMMON = ["--model", "deepfm", "--model", "dcnv2", *TINY_SETS, "--epochs", "2", "--batch-size", "256",
          "--threads", "1", "--dist-timeout", "60"]


def _both(args: list[str], out_ddp: list[str], out_one: list[str]) -> tuple[str, str]:
    """Run ``args`` under torchrun on 2 processes and on one process with --streams 2; their stdouts."""
    ddp = subprocess.run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
                          "-m", "ctr_ensemble.cli", *args, *out_ddp], capture_output=True, text=True, timeout=240, env=ENV)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "ctr_ensemble.cli", *args, *out_one, "--streams", "2"],
                         capture_output=True, text=True, timeout=240, env=ENV)
    assert one.returncode == 0, one.stderr[-3000:]
    return ddp.stdout, one.stdout


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_mutual_on_two_gloo_processes_matches_one_process(tiny_data, tiny_spec, tmp_path):
    """Raw files (in-memory rows, each rank its own streams), scratch mode, dense Adam."""
    tiny_spec.save(tmp_path / "spec.json")
    args = ["train-mutual", "--train", str(tiny_data / "train.tsv"), "--val", str(tiny_data / "val.tsv"),
            "--spec", str(tmp_path / "spec.json"), *COMMON]
    ddp_out, _ = _both(args, ["--out-dir", str(tmp_path / "ddp")], ["--out-dir", str(tmp_path / "one")])
    # rank 0 alone reports and writes: one line per member, the state file cleared, the history beside them
    assert ddp_out.count("val AUC") == 2 and ddp_out.count("on 2 processes") == 2, ddp_out
    assert not (tmp_path / "ddp" / "mutual.state.pt").exists() and (tmp_path / "ddp" / "mutual.history.csv").is_file()
    for name in ("deepfm", "dcnv2"):
        a, b = checkpoint.load(tmp_path / "ddp" / f"{name}.pt"), checkpoint.load(tmp_path / "one" / f"{name}.pt")
        assert a.metrics["processes"] == 2 and b.metrics["processes"] == 1
        assert a.metrics["best_epoch"] == b.metrics["best_epoch"] == 2
        assert _max_diff(a.state_dict, b.state_dict) < 1e-5  # same global batches; only summation order differs
        assert a.metrics["val_auc"] == pytest.approx(b.metrics["val_auc"], abs=1e-4)
        assert a.metrics["val_auc"] > 0.55  # it learned something (0.5 = chance)


def test_collab_on_two_gloo_processes_matches_one_process(prepared, tmp_path):
    """Prepared shard folders (no --spec), learned τ, sparse Adam: sparse gradients all-reduced by gloo."""
    args = ["train-collab", "--train", str(prepared / "train"), "--val", str(prepared / "val"), *COMMON,
            "--head-hidden", "8", "--learn-tau", "--optimizer", "sparse_adam"]
    ddp_out, _ = _both(args, ["--out", str(tmp_path / "ddp" / "c.pt"), "--members-out", str(tmp_path / "ddp" / "m")],
                       ["--out", str(tmp_path / "one" / "c.pt")])
    assert ddp_out.count("fused val AUC") == 1 and "on 2 processes" in ddp_out, ddp_out
    assert not (tmp_path / "ddp" / "c.state.pt").exists() and (tmp_path / "ddp" / "c.history.csv").is_file()
    a, b = ensemble.load(tmp_path / "ddp" / "c.pt"), ensemble.load(tmp_path / "one" / "c.pt")
    assert a.metrics["processes"] == 2 and b.metrics["processes"] == 1
    assert _max_diff(a.head_state, b.head_state) < 1e-5
    assert a.head_state["log_tau"].item() != 0.0  # τ was learned (and all-reduced like the rest)
    for x, y in zip(a.members, b.members):
        # sparse Adam normalises each row's step by its own tiny second moment, so the summation-order noise of
        # gloo's sparse all-reduce grows to ~1.5e-5 over the run (μ = 0.3 scales the member gradients down);
        # a reduction that drops or double-counts a rank changes each step by half its gradient, far above that
        assert _max_diff(x.state_dict, y.state_dict) < 5e-5
        # --members-out: the ordinary member checkpoints, written once with the rest
        assert torch.equal(checkpoint.load(tmp_path / "ddp" / "m" / f"{x.name}.pt").state_dict["head.weight"],
                           x.state_dict["head.weight"])
    assert a.metrics["val_auc"] == pytest.approx(b.metrics["val_auc"], abs=1e-4)
    assert a.metrics["val_auc"] > 0.55


def test_sparse_optimizer_is_refused_on_nccl_for_mutual_and_collab(prepared):
    tr = Prepared(prepared / "train")
    members = mutual.members_from_archs(["deepfm", "dcnv2"], {a: TINY_MODEL[a] for a in ("deepfm", "dcnv2")})
    nccl = Dist(rank=0, world=2, backend="nccl")  # what setup() returns on GPUs; refused before it is used
    with pytest.raises(CtrError, match="NCCL cannot all-reduce sparse gradients"):
        mutual.train_mutual(members, tr.spec, tr, tr, mutual.MutualConfig(optimizer="sparse_adagrad"), dist=nccl)
    with pytest.raises(CtrError, match="NCCL cannot all-reduce sparse gradients"):
        collab.train_collab(members, tr.spec, tr, tr, collab.CollabConfig(optimizer="sparse_adam"), dist=nccl)


def test_mutual_and_collab_cli_take_amp_and_compile(tiny_data, tiny_spec, tmp_path):
    """--amp reaches the trainer (bf16 autocast; losses in float32) and --compile its option checks."""
    from typer.testing import CliRunner

    from ctr_ensemble.cli import app

    tiny_spec.save(tmp_path / "spec.json")
    data = ["--train", str(tiny_data / "train.tsv"), "--val", str(tiny_data / "val.tsv"), "--spec", str(tmp_path / "spec.json")]
    one_epoch = [*COMMON[: COMMON.index("--epochs")], "--epochs", "1", "--batch-size", "512", "--threads", "1"]
    res = CliRunner().invoke(app, ["train-mutual", *data, *one_epoch, "--amp", "bf16", "--out-dir", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    for name in ("deepfm", "dcnv2"):
        ck = checkpoint.load(tmp_path / "m" / f"{name}.pt")
        assert ck.metrics["train_config"]["amp"] == "bf16" and ck.metrics["val_auc"] > 0.5
    res = CliRunner().invoke(app, ["train-collab", *data, *one_epoch, "--compile", "--optimizer", "sparse_adam",
                                   "--out", str(tmp_path / "c.pt")])
    assert isinstance(res.exception, CtrError) and "--compile works with --optimizer adam only" in str(res.exception)
    res = CliRunner().invoke(app, ["train-collab", *data, *one_epoch, "--amp", "fp8", "--out", str(tmp_path / "c.pt")])
    assert isinstance(res.exception, CtrError) and "amp must be one of" in str(res.exception)
