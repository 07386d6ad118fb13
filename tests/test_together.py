"""Training together: deep mutual learning (arXiv 2406.12087) and the collaborative ensemble (arXiv 2411.13700).

Loss formulas on hand-made numbers, both mutual modes producing ordinary loadable/exportable
checkpoints, fine-tuning refusing incompatible checkpoints before any step, the NaN guard, the
collaborative head, and a real kill (SIGKILL) + ``--resume`` reaching the uninterrupted result.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ctr_ensemble.data.fit import fit
from ctr_ensemble.errors import CtrError
from ctr_ensemble.export.reference import load_head
from ctr_ensemble.export.repository import RepoOptions, reconfigure_repository, write_repository
from ctr_ensemble.layers.fusion import COLLABORATIVE, CollaborativeHead, fusion_weights, negation_entropy
from ctr_ensemble.models import checkpoint
from ctr_ensemble.models import ensemble
from ctr_ensemble.training import collab, mutual
from ctr_ensemble.models.predict import predict

from .conftest import TINY_MODEL

CLI = str(Path(sys.executable).parent / "ctr-ensemble")


def _bce(y, p):
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_mutual_loss_equals_the_papers_formula_on_a_hand_example():
    logits = torch.tensor([[0.3, -1.2, 2.0], [-0.5, 0.1, 0.7]], requires_grad=True)
    y = torch.tensor([1.0, 0.0])
    w = 0.7
    total, bce, mse = mutual.mutual_losses(logits, y, w)
    p = torch.sigmoid(logits).detach().tolist()
    n = 3
    for k in range(n):
        want_bce = sum(_bce(y[b].item(), p[b][k]) for b in range(2)) / 2
        # 1/(N−1) Σ_{i≠n} (p_i − p_n)², averaged over the batch
        want_mse = sum((p[b][i] - p[b][k]) ** 2 for b in range(2) for i in range(n) if i != k) / (n - 1) / 2
        assert bce[k].item() == pytest.approx(want_bce, rel=1e-6)
        assert mse[k].item() == pytest.approx(want_mse, rel=1e-6)
    assert total.item() == pytest.approx(sum(bce.tolist()) + w * sum(mse.tolist()), rel=1e-6)
    # Peers are detached targets: member k's gradient is that of its own L_k = BCE + w·mse_k alone.
    total.backward()
    q = torch.sigmoid(logits.detach())
    for k in range(n):
        pk = q[:, k]
        peers = torch.stack([q[:, i] for i in range(n) if i != k], 1)
        # d/dz [BCE] = p − y; d/dz [(p_i − p)²] = −2 (p_i − p) p (1 − p)
        want = ((pk - y) + w * (-2 * (peers - pk[:, None])).sum(1) / (n - 1) * pk * (1 - pk)) / 2
        torch.testing.assert_close(logits.grad[:, k], want, atol=1e-6, rtol=0)


def test_symmetric_kl_and_collab_loss_terms():
    z = torch.tensor([[0.4, -2.0, 1.1], [3.0, 2.5, -0.2]])
    p = torch.sigmoid(z).tolist()

    def kl(a, b):  # Bernoulli KL(a‖b)
        return a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))

    for b in range(2):
        want = sum(kl(p[b][i], p[b][j]) + kl(p[b][j], p[b][i]) for i in range(3) for j in range(i + 1, 3))
        assert collab.symmetric_kl(z)[b].item() == pytest.approx(want, rel=1e-5)
    fused = torch.tensor([[0.2], [-0.3]])
    y = torch.tensor([1.0, 0.0])
    total, parts = collab.collab_losses(fused, z, y, kl_weight=0.25, member_weight=1.0)
    want_fused = (_bce(1, 1 / (1 + math.exp(-0.2))) + _bce(0, 1 / (1 + math.exp(0.3)))) / 2
    want_members = sum(_bce(y[b].item(), p[b][i]) for b in range(2) for i in range(3)) / 2
    assert parts["fused_bce"].item() == pytest.approx(want_fused, rel=1e-6)
    assert parts["member_bce"].item() == pytest.approx(want_members, rel=1e-6)
    assert total.item() == pytest.approx(want_fused + want_members + 0.25 * collab.symmetric_kl(z).mean().item(), rel=1e-6)


@pytest.mark.parametrize("learn_tau", [False, True])
def test_collab_head_weights_and_concat_input(learn_tau):
    torch.manual_seed(0)
    probs = torch.tensor([[0.9, 0.5, 0.2], [0.01, 0.6, 0.45]])
    reprs = [torch.randn(2, d) for d in (3, 5, 2)]
    head = CollaborativeHead([3, 5, 2], hidden=[], tau=0.5, learn_tau=learn_tau)  # linear head: logit = a·z + b
    logit, w = head(probs, reprs)
    # w = softmax(NE(p)/τ) per sample, from the shared reference fusion
    torch.testing.assert_close(w, fusion_weights(probs, "negation_entropy", 0.5))
    torch.testing.assert_close(w, torch.softmax(negation_entropy(probs) / 0.5, 1))
    z = torch.cat([w[:, i : i + 1] * h for i, h in enumerate(reprs)], 1)  # [w_1·h_1 ‖ w_2·h_2 ‖ w_3·h_3]
    lin = head.mlp[0]
    torch.testing.assert_close(logit, z @ lin.weight.T + lin.bias)
    if learn_tau:
        logit.sum().backward()
        assert head.log_tau.grad is not None and head.log_tau.grad.abs() > 0
    summed = CollaborativeHead([3, 5, 2], variant="sum", hidden=[8], proj_dim=4)
    out, _ = summed(probs, reprs)
    assert out.shape == (2, 1)
    with pytest.raises(ValueError, match="tau must be > 0"):
        CollaborativeHead([3, 5], tau=0.0, learn_tau=True)


def _tiny_members(archs):
    return mutual.members_from_archs(archs, {a: TINY_MODEL[a] for a in archs})


def test_mutual_scratch_and_finetune_give_ordinary_checkpoints(tmp_path, tiny_spec, tiny_arrays, tiny_checkpoints):
    tr, va, te = tiny_arrays["train"], tiny_arrays["val"], tiny_arrays["test"]
    scratch = mutual.train_mutual(_tiny_members(["deepfm", "deepfm"]), tiny_spec, tr, va,
                                  mutual.MutualConfig(epochs=1, batch_size=256, max_steps=8, seed=3))
    assert [c.name for c in scratch] == ["deepfm", "deepfm_2"]
    # different initialisations: two copies of one architecture are not the same model
    assert not torch.equal(scratch[0].state_dict["head.weight"], scratch[1].state_dict["head.weight"])
    paths = [checkpoint.save(c, tmp_path / f"{c.name}.pt") for c in tiny_checkpoints]  # deepfm + dcnv2, pretrained
    members, spec = mutual.members_from_checkpoints(paths)
    tuned = mutual.train_mutual(members, spec, tr, va, mutual.MutualConfig.finetune(batch_size=256, max_steps=6))
    cfg = tuned[0].metrics["train_config"]
    assert (cfg["epochs"], cfg["lr"], cfg["lr_decay"]) == (1, 7e-4, pytest.approx(0.1 ** (1 / 3)))
    loaded = []
    for ck, before in zip(tuned, tiny_checkpoints):
        back = checkpoint.load(checkpoint.save(ck, tmp_path / "tuned" / f"{ck.name}.pt"))
        assert back.arch == before.arch and back.metrics["mutual"]["mode"] == "finetune"
        assert back.metrics["mutual"]["init_from"] == str(paths[len(loaded)].resolve())
        np.testing.assert_array_equal(predict(back.build(), te.feeds()), predict(ck.build(), te.feeds()))
        assert not np.array_equal(predict(back.build(), te.feeds()), predict(before.build(), te.feeds()))
        loaded.append(back)
    # exported exactly like independently trained members (ONNX parity checked on the way)
    manifest = write_repository(loaded, tmp_path / "repo", RepoOptions(max_batch_size=256),
                                parity_rows=va.feeds(slice(0, 256)))
    assert set(manifest["members"]) == {"deepfm", "dcnv2"}


def test_finetune_refuses_incompatible_checkpoints_before_training(tmp_path, tiny_data, tiny_checkpoints):
    good = checkpoint.save(tiny_checkpoints[0], tmp_path / "good.pt")
    other_spec = fit(tiny_data / "train.tsv", min_count=5)  # another encoding of the same data
    assert other_spec.fingerprint() != tiny_checkpoints[1].spec.fingerprint()
    odd = tiny_checkpoints[1]
    bad_spec = checkpoint.save(checkpoint.Checkpoint(odd.name, odd.arch, odd.config, other_spec, odd.state_dict), tmp_path / "odd.pt")
    with pytest.raises(CtrError, match=r"odd\.pt: its feature spec .* differs from .*good\.pt"):
        mutual.members_from_checkpoints([good, bad_spec])
    with pytest.raises(CtrError, match="checkpoint not found"):
        mutual.members_from_checkpoints([good, tmp_path / "missing.pt"])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good.read_bytes()[:-10])
    (tmp_path / "corrupt.pt.sha256").write_text((tmp_path / "good.pt.sha256").read_text())
    with pytest.raises(CtrError, match="corrupt"):
        mutual.members_from_checkpoints([good, corrupt])
    with pytest.raises(CtrError, match="at least 2"):
        mutual.members_from_checkpoints([good])
    # the CLI: one error line, exit 2, nothing written
    r = subprocess.run([CLI, "train-mutual", "--train", tiny_data / "train.tsv", "--val", tiny_data / "val.tsv",
                        "--out-dir", tmp_path / "out", "--checkpoint", good, "--checkpoint", bad_spec],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr
    assert "feature spec" in r.stderr and not (tmp_path / "out").exists()


def test_nan_loss_stops_with_step_and_batch_named(tmp_path, tiny_arrays, tiny_checkpoints):
    ck = tiny_checkpoints[0]
    state = {k: v.clone() for k, v in ck.state_dict.items()}
    state["head.weight"][0, 0] = float("nan")  # a diverged pretrained checkpoint
    path = checkpoint.save(checkpoint.Checkpoint("broken", ck.arch, ck.config, ck.spec, state), tmp_path / "broken.pt")
    members, spec = mutual.members_from_checkpoints([checkpoint.save(tiny_checkpoints[1], tmp_path / "ok.pt"), path])
    with pytest.raises(CtrError, match=r"loss is nan at epoch 1, step 1 \(batch 1 of the epoch, 256 rows.*bce_broken"):
        mutual.train_mutual(members, spec, tiny_arrays["train"], tiny_arrays["val"],
                            mutual.MutualConfig.finetune(batch_size=256), state_path=tmp_path / "s.pt")
    assert not (tmp_path / "s.pt").exists()  # nothing was stepped, so nothing was saved


def test_collab_trains_three_members_and_roundtrips(tmp_path, tiny_spec, tiny_arrays):
    tr, va = tiny_arrays["train"], tiny_arrays["val"]
    cfg = collab.CollabConfig(epochs=1, batch_size=256, max_steps=6, kl_weight=0.5,
                              head=collab.HeadConfig(variant="sum", hidden=[8], proj_dim=8, learn_tau=True))
    ck = collab.train_collab(_tiny_members(["deepfm", "dcnv2", "deepfm"]), tiny_spec, tr, va, cfg)
    hist = ck.metrics["history"][0]
    assert {"train_fused_bce", "train_member_bce", "train_sym_kl", "val_auc", "val_auc_deepfm_2", "tau"} <= set(hist)
    back = ensemble.load(ensemble.save(ck, tmp_path / "c.pt"))
    fused, w, member_p = ensemble.predict_collab(back.build(), va.feeds())
    ref = ensemble.predict_collab(ck.build(), va.feeds())
    np.testing.assert_array_equal(fused, ref[0])
    assert w.shape == (len(va), 3) and np.allclose(w.sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(member_p[:, 0], predict(back.members[0].build(), va.feeds()), atol=1e-6)
    # export: ONNX members + the written head reproduce PyTorch (checked inside, recorded in the manifest)
    manifest = write_repository([], tmp_path / "repo", RepoOptions(max_batch_size=256, fusion_mode=COLLABORATIVE),
                                parity_rows=va.feeds(slice(0, 300)), collab=back)
    assert manifest["fusion"]["parity"]["prob_max_abs_diff"] <= 1e-5
    head, names = load_head(tmp_path / "repo" / "fusion" / "1" / "head.pt")
    assert names == ["deepfm", "dcnv2", "deepfm_2"] and head.variant == "sum"
    # redeploying keeps the trained head; it cannot silently become a head-less fusion
    again = reconfigure_repository(tmp_path / "repo", tmp_path / "repo_2x", RepoOptions(instances=2, fusion_mode=COLLABORATIVE))
    assert again["fusion"]["mode"] == COLLABORATIVE and (tmp_path / "repo_2x" / "fusion" / "1" / "head.pt").is_file()
    assert 'key: "head_file"' in (tmp_path / "repo_2x" / "fusion" / "config.pbtxt").read_text()
    with pytest.raises(CtrError, match="pass --fusion-mode collaborative"):
        reconfigure_repository(tmp_path / "repo", tmp_path / "repo_ne", RepoOptions())
    with pytest.raises(CtrError, match="needs a collaborative checkpoint"):
        write_repository(back.members, tmp_path / "repo2", RepoOptions(fusion_mode=COLLABORATIVE))
    (tmp_path / "c.pt").write_bytes((tmp_path / "c.pt").read_bytes()[:-5])
    with pytest.raises(CtrError, match="collaborative checkpoint is corrupt"):
        ensemble.load(tmp_path / "c.pt")


def _mutual_args(tiny_data, out_dir, *extra):
    return ["train-mutual", "--train", str(tiny_data / "train.tsv"), "--val", str(tiny_data / "val.tsv"),
            "--spec", str(out_dir.parent / "spec.json"), "--out-dir", str(out_dir), "--model", "deepfm", "--model", "dcnv2",
            "--set", "deepfm.embedding_dim=4", "--set", "dcnv2.embedding_dim=4", "--set", "dcnv2.cross_layers=1",
            "--epochs", "2", "--batch-size", "128", "--patience", "5", "--save-every", "5", "--threads", "1", "--seed", "9",
            *extra]


def test_killed_training_resumes_to_the_uninterrupted_result(tmp_path, tiny_data, tiny_spec):
    tiny_spec.save(tmp_path / "spec.json")
    threads = torch.get_num_threads()  # --threads sets the process-wide count; restored for the other tests
    try:
        _kill_and_resume(tmp_path, tiny_data)
    finally:
        torch.set_num_threads(threads)


def _kill_and_resume(tmp_path, tiny_data):
    from ctr_ensemble.cli import app

    runner = CliRunner()
    env = {**os.environ, "TQDM_DISABLE": "1"}
    full = runner.invoke(app, _mutual_args(tiny_data, tmp_path / "full"), env=env)
    assert full.exit_code == 0, full.output
    # a real run killed with SIGKILL as soon as its first training state is on disk
    killed = tmp_path / "killed"
    proc = subprocess.Popen([CLI, *_mutual_args(tiny_data, killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "mutual.state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert (killed / "mutual.state.pt").exists(), proc.stderr.read().decode()[-2000:]
    assert not (killed / "deepfm.pt").exists(), "the run finished before it could be killed"
    # a different run must not pick the state up, and a plain rerun must not overwrite it
    other = runner.invoke(app, _mutual_args(tiny_data, killed, "--mutual-weight", "0.5", "--resume"), env=env)
    assert other.exit_code != 0 and "belongs to a different run" in str(other.exception)
    again = runner.invoke(app, _mutual_args(tiny_data, killed), env=env)
    assert again.exit_code != 0 and "pass --resume" in str(again.exception)
    resumed = runner.invoke(app, _mutual_args(tiny_data, killed, "--resume"), env=env)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming at epoch 1" in resumed.output
    assert not (killed / "mutual.state.pt").exists()  # cleared once the checkpoints are written
    for name in ("deepfm", "dcnv2"):
        a, b = checkpoint.load(tmp_path / "full" / f"{name}.pt"), checkpoint.load(killed / f"{name}.pt")
        assert a.metrics["best_epoch"] == b.metrics["best_epoch"]
        for k in a.state_dict:
            assert torch.equal(a.state_dict[k], b.state_dict[k]), (name, k)


def test_collab_member_weight_scales_the_member_terms_only():
    z = torch.tensor([[0.4, -2.0], [3.0, 2.5], [-1.0, 0.2]])
    fused = torch.tensor([[0.2], [-0.3], [1.5]])
    y = torch.tensor([1.0, 0.0, 1.0])
    one, p1 = collab.collab_losses(fused, z, y, kl_weight=0.3, member_weight=1.0)
    for mu in (0.0, 0.25, 3.0):
        total, parts = collab.collab_losses(fused, z, y, kl_weight=0.3, member_weight=mu)
        assert parts["member_bce"].item() == pytest.approx(p1["member_bce"].item())  # reported unweighted
        want = p1["fused_bce"] + mu * p1["member_bce"] + 0.3 * p1["sym_kl"]
        assert total.item() == pytest.approx(want.item(), rel=1e-6)
    assert one.item() == pytest.approx((p1["fused_bce"] + p1["member_bce"] + 0.3 * p1["sym_kl"]).item(), rel=1e-6)


def test_collab_selection_on_fused_logloss(tiny_spec, tiny_arrays):
    m = {"val_auc": 0.7, "val_logloss": 0.45}
    from ctr_ensemble.training.config import selection_score

    assert selection_score(m, "auc") == 0.7 and selection_score(m, "logloss") == -0.45
    with pytest.raises(CtrError, match="select must be one of auc, logloss"):
        collab.train_collab(_tiny_members(["deepfm", "dcnv2"]), tiny_spec, tiny_arrays["train"], tiny_arrays["val"],
                            collab.CollabConfig(select="ne"))
    with pytest.raises(CtrError, match="member weight"):
        collab.train_collab(_tiny_members(["deepfm", "dcnv2"]), tiny_spec, tiny_arrays["train"], tiny_arrays["val"],
                            collab.CollabConfig(member_weight=-1.0))
    # a high lr over-fits within a few epochs: the epoch kept is the one with the lowest fused val logloss
    cfg = collab.CollabConfig(epochs=4, batch_size=512, lr=2e-2, patience=4, plateau_factor=1.0, seed=2, select="logloss",
                              member_weight=1.0,
                              head=collab.HeadConfig(hidden=[8]))
    ck = collab.train_collab(_tiny_members(["deepfm", "dcnv2"]), tiny_spec, tiny_arrays["train"], tiny_arrays["val"], cfg)
    hist = ck.metrics["history"]
    lls, aucs = [h["val_logloss"] for h in hist], [h["val_auc"] for h in hist]
    assert aucs.index(max(aucs)) != lls.index(min(lls)), "this run no longer tells the two selection rules apart"
    assert len(hist) == 4 and ck.metrics["best_epoch"] == 1 + lls.index(min(lls))
    assert ck.metrics["select"] == "logloss" and ck.metrics["val_logloss"] == min(lls)
    fused, _, _ = ensemble.predict_collab(ck.build(), tiny_arrays["val"].feeds())
    from ctr_ensemble import metrics
    assert metrics.logloss(tiny_arrays["val"].label, fused) == pytest.approx(min(lls), abs=1e-6)


def test_collab_detached_head_does_not_train_the_members(tiny_spec, tiny_arrays):
    torch.manual_seed(0)
    nets = mutual.build_members(_tiny_members(["deepfm", "dcnv2"]), tiny_spec, seed=1)
    feeds = {k: torch.from_numpy(v) for k, v in tiny_arrays["val"].feeds(slice(0, 64)).items()}
    grads = {}
    for detach in (False, True):
        model = ensemble.CollaborativeModel(nets, CollaborativeHead([n.repr_dim for n in nets], hidden=[8]), detach_head=detach)
        model.zero_grad()
        fused, member_logits, _ = model.logits(feeds["cat_ids"], feeds["num"])
        fused.sum().backward()  # the fused output alone
        grads[detach] = [p.grad for p in model.members.parameters()]
        assert all(p.grad is not None for p in model.head.parameters())
    assert any(g is not None and g.abs().sum() > 0 for g in grads[False])  # joint: the head's loss trains the members
    assert all(g is None or g.abs().sum() == 0 for g in grads[True])  # detached: it does not


def test_collab_frozen_members_keep_their_weights(tiny_spec, tiny_arrays, tiny_checkpoints):
    members = [mutual.MemberInit(c.name, c.arch, c.config, c.state_dict) for c in tiny_checkpoints]
    cfg = collab.CollabConfig(epochs=1, batch_size=256, max_steps=5, freeze_members=True, head=collab.HeadConfig(hidden=[8]))
    ck = collab.train_collab(members, tiny_spec, tiny_arrays["train"], tiny_arrays["val"], cfg)
    for before, after in zip(tiny_checkpoints, ck.members):
        assert before.state_dict.keys() == after.state_dict.keys()
        for k in before.state_dict:  # weights and buffers (BatchNorm statistics too) untouched
            assert torch.equal(before.state_dict[k], after.state_dict[k]), (before.name, k)
    _, _, member_p = ensemble.predict_collab(ck.build(), tiny_arrays["val"].feeds())
    np.testing.assert_allclose(member_p[:, 0], predict(tiny_checkpoints[0].build(), tiny_arrays["val"].feeds()), atol=1e-6)
    # training mode: the head trains, the frozen members run as served (eval: no dropout, no BatchNorm update)
    model = ensemble.CollaborativeModel([c.build() for c in tiny_checkpoints], CollaborativeHead([4, 4]), freeze_members=True)
    model.train()
    assert model.head.training and not any(m.training for m in model.members.modules())
    assert not any(p.requires_grad for p in model.members.parameters())
    assert all(p.requires_grad for p in model.head.parameters())


def test_train_collab_cli_passes_the_new_options(tmp_path, tiny_data, tiny_spec):
    from ctr_ensemble.cli import app

    tiny_spec.save(tmp_path / "spec.json")
    threads = torch.get_num_threads()
    try:
        res = CliRunner().invoke(app, [
            "train-collab", "--train", str(tiny_data / "train.tsv"), "--val", str(tiny_data / "val.tsv"),
            "--spec", str(tmp_path / "spec.json"), "--out", str(tmp_path / "c.pt"), "--model", "deepfm", "--model", "dcnv2",
            "--set", "deepfm.embedding_dim=4", "--set", "dcnv2.embedding_dim=4", "--set", "dcnv2.cross_layers=1",
            "--head-hidden", "8", "--epochs", "1", "--batch-size", "512", "--threads", "1",
            "--select", "logloss", "--member-weight", "0.5", "--detach-head"], env={**os.environ, "TQDM_DISABLE": "1"})
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    cfg = ensemble.load(tmp_path / "c.pt").train_config
    assert (cfg["select"], cfg["member_weight"], cfg["detach_head"]) == ("logloss", 0.5, True)
    bad = CliRunner().invoke(app, ["train-collab", "--train", str(tiny_data / "train.tsv"), "--val", str(tiny_data / "val.tsv"),
                                   "--spec", str(tmp_path / "spec.json"), "--out", str(tmp_path / "d.pt"),
                                   "--model", "deepfm", "--model", "dcnv2", "--select", "ne"])
    assert bad.exit_code != 0 and "select must be one of auc, logloss" in str(bad.exception)
    assert not (tmp_path / "d.pt").exists()
