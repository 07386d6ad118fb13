"""`deploy` and `rollback` on a running server: under Locust load no request fails and every answer is the old or
the new release's offline prediction; errors leave the served release as it was."""

from __future__ import annotations

import json
import secrets
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as thttp

from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import release as rel
from ctr_ensemble.export import validate
from ctr_ensemble.export.repository import RepoOptions, write_repository
from ctr_ensemble.loadtest.rollout import RolloutConfig, run_rollout
from ctr_ensemble.loadtest.sweep import Target
from ctr_ensemble.serving import deploy as dep
from ctr_ensemble.serving.server import TritonServer

OPT = RepoOptions(max_batch_size=256, fusion_kind="cpu")


@pytest.fixture(scope="module")
def new_export(tmp_path_factory, tiny_checkpoints, tiny_arrays) -> Path:
    """A second release: the same members under another fusion temperature, so its answers differ."""
    repo = tmp_path_factory.mktemp("v2") / "model_repository"
    write_repository(tiny_checkpoints, repo, replace(OPT, tau=0.25), parity_rows=tiny_arrays["val"].feeds())
    return repo


@pytest.fixture()
def served(tmp_path, tiny_repo):
    """A server of its own on a copy of the tiny repository (deploys change the files it serves)."""
    repo = tmp_path / "served"
    shutil.copytree(tiny_repo, repo)
    key = secrets.token_hex(8)
    with TritonServer(repo, admin_key=key) as s:
        yield s


def _target(s: TritonServer) -> Target:
    return Target(s.host, s.http_port, s.grpc_port, s.metrics_port, s.repository, s.admin_key, s)


def test_deploy_and_rollback_under_locust_load_lose_no_request(served, new_export, tiny_data, tmp_path):
    cfg = RolloutConfig(users=2, hold_s=3.0, rows_per_request=8, max_rows=512)
    s = run_rollout(cfg, _target(served), new_export, tiny_data / "test.tsv", tmp_path / "out")
    assert s["errors"] == 0, s["protocols"]
    assert s["answered"]["old"] > 0 and s["answered"]["new"] > 0, s["answered"]
    assert [w["action"] for w in s["switches"]] == ["deploy", "rollback"]
    assert [(w["from_release"], w["release"]) for w in s["switches"]] == [(1, 2), (2, 1)]
    assert s["passed"] and (tmp_path / "out" / "rollout.md").is_file()
    # The files say what the server serves: release 1 again, release 2 kept for a roll forward.
    current, kept = rel.history(served.repository)
    assert current == 1 and sorted(r.id for r in kept) == [1, 2]
    validate.check(served.repository)


def test_deploy_switches_served_answers_and_survives_a_restart(served, new_export, tiny_arrays):
    feeds = {k: v[:64] for k, v in tiny_arrays["test"].feeds().items()}

    def answer(url):
        c = thttp.InferenceServerClient(url)
        ins = []
        for k, v in feeds.items():
            x = thttp.InferInput(k, list(v.shape), "INT64" if v.dtype == np.int64 else "FP32")
            x.set_data_from_numpy(v)
            ins.append(x)
        p = c.infer("ctr_ensemble", ins).as_numpy("prob")[:, 0]
        c.close()
        return p

    before = answer(served.http_url)
    r = dep.deploy(new_export, served.repository, served.http_url, served.admin_key)
    assert r["release"] == 2 and r["models"]["deepfm"] == "deepfm-r2"
    after = answer(served.http_url)
    assert np.max(np.abs(after - before)) > 1e-4
    models = {m["name"]: m.get("state") for m in thttp.InferenceServerClient(served.http_url).get_model_repository_index(
        headers={"admin-key": served.admin_key})}
    assert models["deepfm-r2"] == "READY" and models["deepfm"] in ("UNLOADING", "UNAVAILABLE")  # the old release goes
    served.stop()
    served.http_port = served.grpc_port = served.metrics_port = 0
    served.log_path = None
    served.start()  # a restart (the supervisor's) loads the release the files name
    assert np.max(np.abs(answer(served.http_url) - after)) <= 1e-6
    back = dep.rollback(served.repository, served.http_url, served.admin_key)
    assert back["release"] == 1 and np.max(np.abs(answer(served.http_url) - before)) <= 1e-6
    manifest = json.loads((served.repository / "repository.json").read_text())
    assert manifest["releases"]["current"] == 1 and manifest["fusion"]["tau"] == OPT.tau


def test_deploy_errors_leave_the_served_release_as_it_was(served, new_export, tmp_path, tiny_checkpoints, tiny_arrays):
    snapshot = {p.relative_to(served.repository): p.read_bytes() for p in served.repository.rglob("*") if p.is_file()}
    with pytest.raises(CtrError, match="admin"):
        dep.deploy(new_export, served.repository, served.http_url, "wrong-key")
    with pytest.raises(CtrError, match="no earlier release"):
        dep.rollback(served.repository, served.http_url, served.admin_key)
    # Another feature spec: clients encode with the served one, so it is refused before anything is copied.
    other = tmp_path / "other"
    shutil.copytree(new_export, other)
    m = json.loads((other / "repository.json").read_text())
    m["feature_spec_fingerprint"] = "0" * 16
    (other / "repository.json").write_text(json.dumps(m))
    with pytest.raises(CtrError, match="feature spec"):
        dep.deploy(other, served.repository, served.http_url, served.admin_key)
    # A release Triton refuses to load (a broken Python model): unloaded and deleted, release 1 keeps serving.
    broken = tmp_path / "broken"
    shutil.copytree(new_export, broken)
    (broken / "fusion" / "1" / "model.py").write_text("raise RuntimeError('boom at initialize')\n")
    with pytest.raises(CtrError, match="fusion-r2"):
        dep.deploy(broken, served.repository, served.http_url, served.admin_key)
    now = {p.relative_to(served.repository): p.read_bytes() for p in served.repository.rglob("*") if p.is_file()}
    assert {k: v for k, v in now.items() if k.name != ".deploy.lock"} == snapshot
    assert thttp.InferenceServerClient(served.http_url).is_model_ready("ctr_ensemble")
