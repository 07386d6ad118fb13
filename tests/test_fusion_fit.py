"""The fitted fusion (issue 13): fit on validation data, never worse than the best member there, written into
the fusion model's config and checked by the validator; NaN-safe training with a saturated member."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from ctr_ensemble import metrics, models
from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import fusion_fit, validate
from ctr_ensemble.export.repository import RepoOptions, fitted_rule, read_config, reconfigure_repository, write_repository
from ctr_ensemble.layers.fusion import CollaborativeHead, FusionRule
from ctr_ensemble.models import ensemble
from ctr_ensemble.training import collab, loop, mutual
from ctr_ensemble.training.config import TrainConfig
from ctr_ensemble.training.member import train_member

from .conftest import TINY_MODEL


def _synthetic(seed=0, n=20_000):
    """Labels from a true logit; a good member (small noise), a fair one and a noise member."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.2, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    probs = np.stack([sig(z + rng.normal(0, 0.4, n)), sig(0.7 * z + rng.normal(0, 0.8, n)), sig(rng.normal(0, 2, n))], 1)
    return probs.astype(np.float32), y


def _val_loglosses(rec):
    rows = {r["name"]: r["val"]["logloss"] for r in rec["report"]["rows"]}
    return rows.pop("fitted"), rows.pop("negation_entropy τ=1"), rows.pop("mean"), rows  # rows: the members


@pytest.mark.parametrize("space", ["prob", "logit", "auto"])
def test_fit_beats_every_baseline_on_members_of_unequal_quality(space):
    probs, y = _synthetic()
    names = ["good", "fair", "noise"]
    rule, rec = fusion_fit.fit(names, probs, y, space)
    rec["report"] = fusion_fit.report(names, rule, {"val": (probs, y)})
    fitted, ne, mean, members = _val_loglosses(rec)
    assert fitted <= min(members.values()) and fitted <= ne and fitted <= mean
    assert rec["report"]["best_member"] == "good"
    assert rule.space in ({"prob", "logit"} if space == "auto" else {space})
    w = rule.fuse(torch.from_numpy(probs))[1].numpy().mean(0)
    assert w[2] < 0.05 < w[0]  # the noise member is all but switched off
    assert fitted == pytest.approx(metrics.logloss(y, fusion_fit.fused(rule, probs)))
    assert rec["val_logloss"] == fitted and rec["chosen"] == min(rec["candidates"], key=lambda c: c["val_logloss"])["name"]


def test_a_lone_good_member_is_kept_exactly():
    # Two copies of noise around one informative member: nothing beats the member alone; the fit returns it, bit for bit.
    rng = np.random.default_rng(3)
    n = 5000
    z = rng.normal(-1, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64)
    probs = np.stack([1 / (1 + np.exp(-z)), rng.uniform(0.001, 0.999, n), rng.uniform(0.001, 0.999, n)], 1).astype(np.float32)
    rule, rec = fusion_fit.fit(["oracle", "u1", "u2"], probs, y, "prob")
    served = fusion_fit.fused(rule, probs)
    assert metrics.logloss(y, served) <= metrics.logloss(y, probs[:, 0])
    if rec["chosen"] == "member oracle alone":
        assert np.array_equal(served, probs[:, 0])


def test_fit_refuses_one_class_and_bad_space():
    probs, y = _synthetic(n=100)
    with pytest.raises(CtrError, match="both clicks and non-clicks"):
        fusion_fit.fit(["a", "b", "c"], probs, np.zeros_like(y))
    with pytest.raises(CtrError, match="--fusion-space"):
        fusion_fit.fit(["a", "b", "c"], probs, y, "odds")


@pytest.fixture(scope="module")
def unequal_members(tiny_spec, tiny_arrays, tiny_checkpoints):
    """A member trained one step (about a coin) beside the two properly trained tiny members."""
    weak = train_member("weak", "deepfm", models.make_config("deepfm", TINY_MODEL["deepfm"]), tiny_spec, tiny_arrays["train"],
                        tiny_arrays["val"], TrainConfig(epochs=1, batch_size=256, seed=5, max_steps=1))
    return [weak, *tiny_checkpoints]


def test_export_writes_the_fitted_rule_and_the_report(tmp_path, unequal_members, tiny_arrays):
    rule, rec = fusion_fit.fit_for_export(unequal_members, tiny_arrays["val"], tiny_arrays["test"], "auto")
    fitted, ne, mean, members = _val_loglosses(rec)
    assert fitted <= min(members.values()) and fitted <= ne and fitted <= mean
    assert set(rec["report"]["splits"]) == {"val", "test"}
    opt = RepoOptions(max_batch_size=256, fusion_mode="fitted", tau=rule.tau, priors=list(rule.priors), space=rule.space)
    manifest = write_repository(unequal_members, tmp_path / "repo", opt, parity_rows=tiny_arrays["val"].feeds(), fusion_fit=rec)
    params = {k: v.string_value for k, v in read_config(tmp_path / "repo" / "fusion").parameters.items()}
    assert FusionRule.from_params(params, members=3) == rule
    assert manifest["fusion"]["priors"] == list(rule.priors) and manifest["fusion"]["fit"]["chosen"] == rec["chosen"]
    assert manifest["fusion"]["parity"]["prob_max_abs_diff"] <= 1e-5  # the rule over ONNX members vs over PyTorch
    assert json.loads((tmp_path / "repo" / "repository.json").read_text())["fusion"]["fit"]["report"] == rec["report"]
    # a redeploy as τ = 1 keeps the fit; `--fusion-mode fitted` brings the fitted rule back from it
    ne_manifest = reconfigure_repository(tmp_path / "repo", tmp_path / "ne", RepoOptions(max_batch_size=256, tau=1.0))
    assert ne_manifest["fusion"]["mode"] == "negation_entropy" and "priors" not in ne_manifest["fusion"]
    assert 'key: "priors"' not in (tmp_path / "ne" / "fusion" / "config.pbtxt").read_text()
    back = reconfigure_repository(tmp_path / "ne", tmp_path / "back", RepoOptions(max_batch_size=256, fusion_mode="fitted"))
    assert fitted_rule(back) == rule and (tmp_path / "back" / "fusion" / "config.pbtxt").read_text() == \
        (tmp_path / "repo" / "fusion" / "config.pbtxt").read_text()


def test_fitted_mode_without_parameters_or_with_wrong_ones_is_refused(tmp_path, tiny_checkpoints, tiny_repo):
    with pytest.raises(CtrError, match="--fit-fusion"):
        write_repository(tiny_checkpoints, tmp_path / "r", RepoOptions(fusion_mode="fitted"))
    with pytest.raises(CtrError, match="3 priors for 2 members"):
        write_repository(tiny_checkpoints, tmp_path / "r", RepoOptions(fusion_mode="fitted", priors=[0, 0, 0]))
    with pytest.raises(CtrError, match="space"):
        write_repository(tiny_checkpoints, tmp_path / "r", RepoOptions(fusion_mode="fitted", priors=[0, 0], space="odds"))
    with pytest.raises(CtrError, match="has no fitted fusion"):
        reconfigure_repository(tiny_repo, tmp_path / "r", RepoOptions(fusion_mode="fitted"))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("edit,expected", [
    (('string_value: "[0.0, -1.5]"', 'string_value: "[0.0]"'), "priors has 1 entries but the model has 2 member inputs"),
    (('string_value: "[0.0, -1.5]"', 'string_value: "zero"'), "priors must be a JSON list"),
    (('string_value: "logit"', 'string_value: "odds"'), "space must be one of"),
    (('string_value: "0.25"', 'string_value: "-1"'), "tau must be > 0"),
])
def test_validator_checks_the_fitted_parameters(tmp_path, tiny_checkpoints, edit, expected):
    repo = tmp_path / "repo"
    write_repository(tiny_checkpoints, repo, RepoOptions(fusion_mode="fitted", tau=0.25, priors=[0.0, -1.5], space="logit"))
    assert validate.validate(repo) == []
    cfg = repo / "fusion" / "config.pbtxt"
    assert edit[0] in cfg.read_text()
    cfg.write_text(cfg.read_text().replace(*edit))
    problems = validate.validate(repo)
    assert any("fusion/config.pbtxt: fusion parameters" in p and expected in p for p in problems), problems


# --- numerics: a saturated member in the collaborative ensemble, and the loop's gradient guard ----------------------


def _saturated(member_init, spec, bias):
    """The member with its output pinned at logit ``bias`` (sigmoid exactly 1 in float32 for bias >= 17)."""
    net = models.build(member_init.arch, member_init.config, spec)
    state = net.state_dict()
    state["head.weight"].zero_()
    state["head.bias"].fill_(bias)
    return mutual.MemberInit(member_init.name, member_init.arch, member_init.config, state)


@pytest.mark.parametrize("bias", [30.0, -120.0])
def test_collaborative_step_with_a_saturated_member_has_finite_gradients(tiny_spec, tiny_arrays, bias):
    inits = mutual.members_from_archs(["deepfm", "dcnv2"], {a: TINY_MODEL[a] for a in ("deepfm", "dcnv2")})
    inits[0] = _saturated(inits[0], tiny_spec, bias)
    nets = mutual.build_members(inits, tiny_spec, seed=0)
    model = ensemble.CollaborativeModel(nets, CollaborativeHead([n.repr_dim for n in nets], hidden=[8], learn_tau=True))
    tr = tiny_arrays["train"]
    fused, member_logits, _ = model.logits(torch.from_numpy(tr.cat_ids[:256]), torch.from_numpy(tr.num[:256]))
    assert (torch.sigmoid(member_logits[:, 0]) == (1.0 if bias > 0 else 0.0)).all()
    total, _ = collab.collab_losses(fused, member_logits, torch.from_numpy(tr.label[:256].astype(np.float32)), 0.1)
    total.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    # and through the training loop, whose guard refuses any non-finite gradient before the step
    ck = collab.train_collab(inits, tiny_spec, tr, tiny_arrays["val"],
                             collab.CollabConfig(epochs=1, batch_size=256, max_steps=3, head=collab.HeadConfig(hidden=[8])))
    assert all(torch.isfinite(v).all() for m in ck.members for v in m.state_dict.values() if v.is_floating_point())


class _SqrtAtZero(nn.Module):
    """loss = sqrt(w) at w = 0: a finite loss (0) whose gradient is inf."""

    def __init__(self):
        super().__init__()
        self.ok = nn.Parameter(torch.ones(3))
        self.w = nn.Parameter(torch.zeros(1))


def test_loop_refuses_a_non_finite_gradient_before_the_step(tmp_path):
    module = _SqrtAtZero()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)

    def loss(idx):
        return module.w.sqrt().sum() + 0.0 * module.ok.sum(), {}  # `ok` (listed first) gets a finite gradient

    task = loop.Task("sqrt", module, opt, loss, lambda: (0.0, {}))
    with pytest.raises(CtrError, match=r"sqrt: non-finite gradient at epoch 1, step 1 \(batch 1 of the epoch, 4 rows\), first in w\."):
        loop.run(task, 8, loop.LoopConfig(epochs=1, batch_size=4), state_path=tmp_path / "s.pt")
    assert torch.equal(module.w.detach(), torch.zeros(1)) and torch.equal(module.ok.detach(), torch.ones(3))  # not stepped
    assert not (tmp_path / "s.pt").exists()


# --- the fitted fusion on the latency curve: load-test sweep variants --------------------------------------------


def test_sweep_fitted_variant_shares_a_fitted_base_and_is_skipped_without_a_fit(tmp_path, tiny_repo, tiny_data):
    from dataclasses import asdict

    from ctr_ensemble.loadtest import sweep

    names = [v.name for v in sweep.DEFAULT_VARIANTS]
    assert {"ensemble_ne", "ensemble_fitted"} <= set(names)
    ne_base = sweep.base_options(tiny_repo)  # exported with negation entropy, τ = 1
    fitted_base = asdict(RepoOptions(fusion_mode="fitted", tau=0.5, priors=[0.0, -1.0], space="logit"))
    assert sweep.changes_nothing(sweep.NE_TAU1, ne_base) and not sweep.changes_nothing({"fusion_mode": "fitted"}, ne_base)
    assert sweep.changes_nothing({"fusion_mode": "fitted"}, fitted_base) and not sweep.changes_nothing(sweep.NE_TAU1, fitted_base)
    assert not sweep.changes_nothing({**sweep.NE_TAU1, "instances": 2}, ne_base)
    # one server per deployment, however the options are written
    assert sweep.deployment_key({"instances": 2}, ne_base) == sweep.deployment_key({**sweep.NE_TAU1, "instances": 2}, ne_base)
    assert sweep.deployment_key({"instances": 2}, ne_base) != sweep.deployment_key({"instances": 3}, ne_base)
    assert sweep.deployment_key(sweep.NE_TAU1, ne_base) == "{}"
    cfg = sweep.SweepConfig(variants=[v for v in sweep.default_sweep().variants if v.name == "ensemble_fitted"], perf_analyzer=False)
    res = sweep.run_sweep(cfg, tiny_repo, tiny_data / "test.tsv", tmp_path / "out")
    assert [(r["variant"], r["status"]) for r in res.rows] == [("ensemble_fitted", "skipped")] and not res.failed
    assert "no fitted fusion" in res.rows[0]["note"]
