"""Scale: `data prepare` (round trip, resume, damaged shards), the shard loader, sparse optimizers, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ctr_ensemble import models
from ctr_ensemble.data.prepared import prepare as prep
from ctr_ensemble.data.prepared.manifest import MANIFEST, shard_file
from ctr_ensemble.data.encode import Arrays, encode_file
from ctr_ensemble.data.fit import fit, token_partition
from ctr_ensemble.data.prepared.shards import Prepared
from ctr_ensemble.data.spec import FeatureSpec
from ctr_ensemble.data.synth import SynthConfig, generate
from ctr_ensemble.errors import CtrError
from ctr_ensemble.training import loader
from ctr_ensemble.training.config import TrainConfig
from ctr_ensemble.training.member import train_member
from ctr_ensemble.training.step import Optimizers
from ctr_ensemble.serving.server import free_port
from tests.conftest import TINY_CARDS, TINY_MODEL

BIN = Path(sys.executable).parent
CLI = [sys.executable, "-m", "ctr_ensemble.cli"]


def _prep(src, out, spec=None, **kw) -> prep.PrepareResult:
    opts = prep.PrepareOptions(**{"min_count": 2, "chunk_mb": 0.25, "workers": 1, **kw})
    return prep.prepare([src], out, opts, spec=spec, progress=False)


def _same_feeds(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _same_spec(a: FeatureSpec, b: FeatureSpec) -> None:
    assert [f.vocab for f in a.categorical] == [f.vocab for f in b.categorical]
    assert a.sequence == b.sequence
    for x, y in zip(a.numeric, b.numeric):  # sums in another order: equal to rounding
        assert x.name == y.name and x.mean == pytest.approx(y.mean, rel=1e-9) and x.std == pytest.approx(y.std, rel=1e-9)


def test_prepare_round_trip_equals_in_memory_encoding(prepared, tiny_data, tiny_spec):
    tr = Prepared(prepared / "train", verify="full")
    _same_spec(tr.spec, tiny_spec)
    ref = encode_file(tiny_data / "train.tsv", tr.spec)
    _same_feeds(tr.feeds(), ref.feeds())
    np.testing.assert_array_equal(tr.labels(), ref.label)
    va = Prepared(prepared / "val")
    assert va.spec.fingerprint() == tr.spec.fingerprint()
    _same_feeds(va.feeds(), encode_file(tiny_data / "val.tsv", tr.spec).feeds())
    # Slices that cross shard boundaries read the same rows.
    edge = int(tr.offsets[1])
    _same_feeds(tr.feeds(edge - 5, edge + 7), ref.feeds(slice(edge - 5, edge + 7)))


def test_prepare_sequence_parquet_round_trip(tmp_path):
    generate(tmp_path, SynthConfig(seed=5, cardinalities=TINY_CARDS, splits={"train": 3000}, seq_max_len=8),
             chunk_rows=400)  # 8 row groups → several chunks
    src = tmp_path / "train.parquet"
    r = _prep(src, tmp_path / "p", chunk_mb=0.05, seq_max_len=8)
    assert r.shards > 1
    p = Prepared(tmp_path / "p", verify="full")
    spec = fit(src, min_count=2, seq_max_len=8)
    _same_spec(p.spec, spec)
    assert p.spec.fitted_on["sequence"] == spec.fitted_on["sequence"]
    assert set(p.spec.input_names) == {"cat_ids", "num", "seq_ids", "seq_len"}
    _same_feeds(p.feeds(), encode_file(src, spec).feeds())


def test_resume_does_not_reread_finished_chunks(tiny_data, tmp_path, monkeypatch):
    clean = _prep(tiny_data / "train.tsv", tmp_path / "clean")
    seen: list[int] = []
    real = prep.run_chunk

    def interrupted(task):
        if len(seen) == 3:
            raise KeyboardInterrupt  # as if killed after three chunks
        seen.append(task.index)
        return real(task)

    monkeypatch.setattr(prep, "run_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _prep(tiny_data / "train.tsv", tmp_path / "out")
    assert not (tmp_path / "out" / MANIFEST).exists()
    # A file of a finished chunk lost as well: that chunk alone is read again.
    lost = tmp_path / "out" / shard_file(seen[1], "num")
    lost.unlink()
    again: list[int] = []
    monkeypatch.setattr(prep, "run_chunk", lambda task: again.append(task.index) or real(task))
    r = _prep(tiny_data / "train.tsv", tmp_path / "out")
    assert sorted(again) == sorted({seen[1]} | set(range(clean.shards)) - set(seen))
    assert r.chunks_resumed == 2 and r.chunks_run == len(again)
    a = json.loads((tmp_path / "clean" / MANIFEST).read_text())["shards"]
    b = json.loads((tmp_path / "out" / MANIFEST).read_text())["shards"]
    assert [s["files"] for s in a] == [{k: {**v} for k, v in s["files"].items()} for s in b]  # same bytes (CRC-32)
    assert not (tmp_path / "out" / prep.WORK).exists()


def test_large_fields_merge_in_hash_partitions_with_the_same_result(tiny_data, tmp_path, monkeypatch):
    whole = _prep(tiny_data / "train.tsv", tmp_path / "whole")
    monkeypatch.setattr(prep, "PARTITION_ENTRIES", 200)  # fields with > 200 (token, chunk) entries: partitioned
    calls, real = [], token_partition
    monkeypatch.setattr(prep, "token_partition", lambda v, parts: calls.append(parts) or real(v, parts))
    parts = _prep(tiny_data / "train.tsv", tmp_path / "parts")
    assert calls and max(calls) >= 5
    a, b = Prepared(whole.out), Prepared(parts.out)
    assert a.spec.to_dict() == b.spec.to_dict()  # vocabularies, order and distinct-token counts alike
    _same_feeds(a.feeds(), b.feeds())


def test_bad_row_in_a_later_chunk_names_its_line_in_the_file(tiny_data, tmp_path):
    lines = (tiny_data / "train.tsv").read_text().splitlines(keepends=True)
    lines[4321] = "1\tnot-a-number" + "\t" * 38 + "\n"
    bad = tmp_path / "bad.tsv"
    bad.write_text("".join(lines))
    with pytest.raises(CtrError, match=f"{bad}:line 4322, field I1: expected a number"):
        _prep(bad, tmp_path / "out", workers=1)
    r = _prep(bad, tmp_path / "skip", skip_bad_rows=True)
    assert r.rows == 5999 and r.skipped == 1
    m = json.loads((tmp_path / "skip" / MANIFEST).read_text())
    assert m["skipped"] == 1 and "line 4322" in m["skipped_examples"][0]


def test_resume_refuses_other_options_and_foreign_folder(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "run_chunk", lambda task: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _prep(tiny_data / "train.tsv", tmp_path / "out")
    with pytest.raises(CtrError, match="unfinished prepare of other inputs or options.*options"):
        _prep(tiny_data / "train.tsv", tmp_path / "out", min_count=3)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("x")
    with pytest.raises(CtrError, match="not a \\(partial\\) `data prepare` output"):
        _prep(tiny_data / "train.tsv", tmp_path / "foreign")


def test_missing_or_corrupt_shard_is_named_and_repaired(prepared, tiny_data, tmp_path):
    import shutil

    d = tmp_path / "train"
    shutil.copytree(prepared / "train", d)
    ref = Prepared(d).feeds()
    missing = d / shard_file(1, "cat_ids")
    missing.unlink()
    with pytest.raises(CtrError, match=f"{missing}: shard file missing"):
        Prepared(d)
    _prep(tiny_data / "train.tsv", d, workers=2)  # same command again: re-encodes shard 1 only
    _same_feeds(Prepared(d, verify="full").feeds(), ref)
    trunc = d / shard_file(2, "num")
    trunc.write_bytes(trunc.read_bytes()[:-40])
    with pytest.raises(CtrError, match=f"{trunc}: shard file is corrupt"):
        Prepared(d)
    _prep(tiny_data / "train.tsv", d, workers=2)
    flip = d / shard_file(0, "cat_ids")
    raw = bytearray(flip.read_bytes())
    raw[-3] ^= 0xFF  # same size, wrong content: only the CRC-32 sees it
    flip.write_bytes(bytes(raw))
    Prepared(d)  # the cheap check passes
    with pytest.raises(CtrError, match=f"corrupt .*{flip.relative_to(d)}"):
        Prepared(d, verify="full")
    r = _prep(tiny_data / "train.tsv", d, workers=2)
    assert r.checked and r.chunks_run == 1
    _same_feeds(Prepared(d, verify="full").feeds(), ref)


def _unique_rows(n: int, seq: bool = False) -> Arrays:
    ids = np.arange(n, dtype=np.int64)
    s = (np.stack([ids, ids], 1), np.ones((n, 1), np.int64)) if seq else (None, None)
    return Arrays(np.stack([ids, ids % 7], 1), np.zeros((n, 1), np.float32), (ids % 2).astype(np.float32), 0, *s)


@pytest.mark.parametrize("shuffle", ["block", "full"])
def test_loader_batches_cover_every_row_once_per_epoch(shuffle):
    n = 10_007
    data = _unique_rows(n, seq=True)
    names = ("cat_ids", "num", "seq_ids", "seq_len")
    cfg = loader.LoaderConfig(batch_size=96, seed=1, shuffle=shuffle, block_rows=100, buffer_rows=1000)
    one = loader.Batches(data, names, cfg)
    for epoch in (1, 2):
        rows = [x["cat_ids"][:, 0] for x, _ in one.epoch(epoch)]
        assert len(rows) == len(one) == -(-n // 96)
        assert all(len(r) == 96 for r in rows[:-1])
        got = torch.cat(rows)
        assert sorted(got.tolist()) == list(range(n))  # every row exactly once
        assert not torch.equal(got[:200], torch.arange(200))  # shuffled
        x, y = next(iter(one.epoch(epoch)))
        assert x["cat_ids"].dtype == torch.int64 and x["num"].dtype == torch.float32 and y.dtype == torch.float32
        np.testing.assert_array_equal(y.numpy(), (x["cat_ids"][:, 0] % 2).numpy())  # rows stay whole
    # Two streams: one process with streams=2 yields rank 0's and rank 1's local batches, concatenated.
    two = loader.Batches(data, names, loader.LoaderConfig(**{**cfg.__dict__, "streams": 2}))
    ranks = [loader.Batches(data, names, cfg, rank=r, world=2) for r in (0, 1)]
    assert len(two) == len(ranks[0]) == len(ranks[1])
    for (x, _), (x0, _), (x1, _) in zip(two.epoch(3), ranks[0].epoch(3), ranks[1].epoch(3)):
        assert torch.equal(x["cat_ids"], torch.cat([x0["cat_ids"], x1["cat_ids"]]))
    half = n // 2  # each rank reads only its own contiguous range; the odd last row sits this epoch out
    r0 = torch.cat([x["cat_ids"][:, 0] for x, _ in ranks[0].epoch(1)])
    r1 = torch.cat([x["cat_ids"][:, 0] for x, _ in ranks[1].epoch(1)])
    assert sorted(r0.tolist()) == list(range(half)) and sorted(r1.tolist()) == list(range(half, 2 * half))


def test_loader_over_prepared_shards_matches_the_rows(prepared):
    p = Prepared(prepared / "train")
    names = p.spec.input_names
    b = loader.Batches(p, names, loader.LoaderConfig(batch_size=500, block_rows=256, buffer_rows=1024, prefetch=2))
    got = torch.cat([torch.cat([x["cat_ids"], x["num"].nan_to_num(-7).to(torch.int64), y[:, None].to(torch.int64)], 1)
                     for x, y in b.epoch(1)])
    f = p.feeds()
    want = torch.from_numpy(np.concatenate([f["cat_ids"], np.nan_to_num(f["num"], nan=-7).astype(np.int64),
                                            p.labels()[:, None].astype(np.int64)], 1))
    assert torch.equal(torch.unique(got, dim=0, sorted=True), torch.unique(want, dim=0, sorted=True))
    assert len(got) == len(want)


def test_batch_size_must_split_over_processes(prepared):
    p = Prepared(prepared / "train")
    with pytest.raises(CtrError, match="multiple of the number of streams"):
        loader.Batches(p, p.spec.input_names, loader.LoaderConfig(batch_size=255), rank=0, world=2)


@pytest.mark.parametrize("opt", ["sparse_adam", "sparse_adagrad"])
def test_sparse_optimizer_touches_only_batch_rows_and_learns(opt, prepared):
    tr, va = Prepared(prepared / "train"), Prepared(prepared / "val")
    cfg = TrainConfig(epochs=3, batch_size=256, optimizer=opt, emb_lr=0.05 if opt == "sparse_adagrad" else 0.0,
                      patience=5)
    model = models.build("deepfm", models.make_config("deepfm", TINY_MODEL["deepfm"]), tr.spec)
    opts = Optimizers(model, cfg)
    assert [type(o).__name__ for o in opts.opts] == [{"sparse_adam": "SparseAdam", "sparse_adagrad": "Adagrad"}[opt], "Adam"]
    x, y = next(iter(loader.Batches(tr, tr.spec.input_names, loader.LoaderConfig(batch_size=64)).epoch(1)))
    before = model.embedding.table.weight.detach().clone()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model.logits(x["cat_ids"], x["num"])[0][:, 0], y)
    loss.backward()
    grad = model.embedding.table.weight.grad
    assert grad.is_sparse
    data_grad = grad.coalesce().to_dense()
    opts.step()
    # The coupled L2 (weight_decay · w) reached the batch's rows only, like dense Adam's weight_decay would.
    g = model.embedding.table.weight.grad.to_dense()
    rows = data_grad.abs().sum(1) > 0
    torch.testing.assert_close(g[rows], data_grad[rows] + cfg.weight_decay * before[rows])
    assert not g[~rows].any()
    touched = torch.zeros(len(before), dtype=torch.bool)
    touched[(x["cat_ids"] + model.embedding.offsets).flatten()] = True
    changed = (model.embedding.table.weight.detach() != before).any(1)
    assert changed[touched].all() and not changed[~touched].any()
    ck = train_member("deepfm", "deepfm", models.make_config("deepfm", TINY_MODEL["deepfm"]), tr.spec, tr, va, cfg)
    losses = [h["train_logloss"] for h in ck.metrics["history"]]
    assert losses[-1] < losses[0] - 0.02 and ck.metrics["val_auc"] > 0.62


def test_resume_from_prepared_shards_reaches_the_uninterrupted_result(prepared, tmp_path, monkeypatch):
    tr, va = Prepared(prepared / "train"), Prepared(prepared / "val")
    cfg = TrainConfig(epochs=2, batch_size=512, optimizer="sparse_adam", save_every=5, patience=5)
    args = ("dcnv2", "dcnv2", models.make_config("dcnv2", TINY_MODEL["dcnv2"]), tr.spec, tr, va, cfg)
    whole = train_member(*args)
    real, calls = Optimizers.step, []

    def killed_at_step_19(self):
        calls.append(1)
        if len(calls) == 19:  # killed in epoch 2 (12 steps per epoch); the last state is of step 15, mid-epoch
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(Optimizers, "step", killed_at_step_19)
    with pytest.raises(KeyboardInterrupt):
        train_member(*args, state_path=tmp_path / "m.state.pt")
    monkeypatch.setattr(Optimizers, "step", real)
    resumed = train_member(*args, state_path=tmp_path / "m.state.pt", resume=True)
    for k, v in whole.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[k], v, rtol=1e-5, atol=1e-6)
    assert resumed.metrics["val_auc"] == pytest.approx(whole.metrics["val_auc"], abs=1e-6)


def test_bf16_autocast_trains(prepared):
    tr, va = Prepared(prepared / "train"), Prepared(prepared / "val")
    ck = train_member("dcnv2", "dcnv2", models.make_config("dcnv2", TINY_MODEL["dcnv2"]), tr.spec, tr, va,
                      TrainConfig(epochs=1, batch_size=256, amp="bf16", max_steps=8))
    assert np.isfinite(ck.metrics["history"][0]["train_logloss"]) and ck.metrics["val_auc"] > 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_cuda_training_from_shards_with_pinned_prefetch(prepared):
    tr, va = Prepared(prepared / "train"), Prepared(prepared / "val")
    ck = train_member("dcnv2", "dcnv2", models.make_config("dcnv2", TINY_MODEL["dcnv2"]), tr.spec, tr, va,
                      TrainConfig(epochs=1, batch_size=256, device="cuda", prefetch=2, optimizer="sparse_adam",
                                  amp="bf16"))
    assert ck.metrics["val_auc"] > 0.55 and all(v.device.type == "cpu" for v in ck.state_dict.values())


def test_fit_cap_on_distinct_tokens(tiny_data):
    exact = fit(tiny_data / "train.tsv", min_count=1)
    same = fit(tiny_data / "train.tsv", min_count=1, max_distinct=10_000)  # above every field's count
    assert same.to_dict() == exact.to_dict()
    capped = fit(tiny_data / "train.tsv", min_count=1, max_distinct=20)
    assert all(f.size <= 21 for f in capped.categorical)
    big = max(range(exact.n_cat), key=lambda f: exact.cat_sizes[f])
    assert capped.categorical[big].vocab[:5] == exact.categorical[big].vocab[:5]  # the frequent ones survive
    cap = capped.fitted_on["max_distinct_capped"][exact.categorical[big].name]
    assert cap["distinct_dropped"] > 0 and cap["max_count_dropped"] >= 1


# ---------------------------------------------------------------------------------------------- DDP
def _train_args(prepared: Path, out: Path) -> list[str]:
    return ["train", "--model", "dcnv2", "--train", str(prepared / "train"), "--val", str(prepared / "val"),
            "--out", str(out), "--batch-size", "256", "--threads", "1", "--set", "embedding_dim=4",
            "--set", "hidden=[16]", "--set", "cross_layers=2", "--dist-timeout", "60"]


def test_ddp_two_gloo_processes_match_one_process(prepared, tmp_path):
    from ctr_ensemble.models import checkpoint

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
                          "-m", "ctr_ensemble.cli", *_train_args(prepared, tmp_path / "ddp.pt"), "--epochs", "2",
                          "--optimizer", "sparse_adam"],  # sparse gradients all-reduced by gloo
                         capture_output=True, text=True, timeout=240, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "on 2 processes" in ddp.stdout and ddp.stdout.count("best val AUC") == 1  # rank 0 alone reports/writes
    one = subprocess.run([*CLI, *_train_args(prepared, tmp_path / "one.pt"), "--epochs", "2", "--streams", "2",
                          "--optimizer", "sparse_adam"],
                         capture_output=True, text=True, timeout=240, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = checkpoint.load(tmp_path / "ddp.pt"), checkpoint.load(tmp_path / "one.pt")
    assert a.metrics["processes"] == 2 and b.metrics["processes"] == 1
    diff = max((a.state_dict[k] - b.state_dict[k]).abs().max().item() for k in a.state_dict)
    assert diff < 1e-5  # same global batches; only the gradient summation order differs
    assert a.metrics["val_auc"] == pytest.approx(b.metrics["val_auc"], abs=1e-4)
    assert (tmp_path / "ddp.history.csv").is_file()


def test_sparse_optimizer_is_refused_on_nccl_and_with_compile(prepared):
    from ctr_ensemble.training.distributed import Dist

    tr = Prepared(prepared / "train")
    nccl = Dist(rank=0, world=2, backend="nccl")  # what setup() returns on GPUs; refused before it is used
    args = ("dcnv2", "dcnv2", models.make_config("dcnv2", TINY_MODEL["dcnv2"]), tr.spec, tr, tr)
    with pytest.raises(CtrError, match="NCCL cannot all-reduce sparse gradients"):
        train_member(*args, TrainConfig(optimizer="sparse_adam"), dist=nccl)
    with pytest.raises(CtrError, match="--compile works with --optimizer adam only"):
        train_member(*args, TrainConfig(optimizer="sparse_adam", compile=True))


def test_dead_ddp_worker_stops_the_job_with_a_clear_error(prepared, tmp_path):
    args = [*CLI, *_train_args(prepared, tmp_path / "m.pt"), "--epochs", "500", "--patience", "1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2"}
    log = tmp_path / "rank0.log"
    with open(log, "w") as f0:
        r0 = subprocess.Popen(args, env={**env, "RANK": "0", "LOCAL_RANK": "0"}, stdout=f0, stderr=subprocess.STDOUT)
        r1 = subprocess.Popen(args, env={**env, "RANK": "1", "LOCAL_RANK": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 180
            while "epoch 1/" not in log.read_text() and time.monotonic() < deadline and r0.poll() is None:
                time.sleep(0.2)
            assert "epoch 1/" in log.read_text(), log.read_text()[-2000:]
            r1.send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            code = r0.wait(timeout=90)  # well before the 60 s collective timeout would matter: gloo sees the reset
        finally:
            for p in (r0, r1):
                if p.poll() is None:
                    p.kill()
                    p.wait()
    out = log.read_text()
    assert code == 2, out[-2000:]
    assert time.monotonic() - t0 < 60
    assert "error: rank 0/2:" in out and "another worker stopped or did not answer" in out
