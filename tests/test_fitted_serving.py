"""Integration: `ctr-ensemble export --fit-fusion` on members of unequal quality, served by the real tritonserver.

One member is trained a single step (about a coin), two properly. The fitted rule must be no worse in
validation logloss than the best member (and than τ = 1 and the mean); what Triton serves over HTTP and
gRPC must equal the fitted rule applied to the members' PyTorch outputs to 1e-5, and so must the three
offline references (evaluate's, the load test's, the export's own fused parity).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ctr_ensemble import models
from ctr_ensemble.evaluation.evaluate import EvalTargets, evaluate
from ctr_ensemble.export import onnx_export
from ctr_ensemble.export.repository import ENSEMBLE_NAME, manifest_rule, read_manifest
from ctr_ensemble.loadtest.rows import OfflineReference, inputs_from_config, load_rows
from ctr_ensemble.serving.client import TritonScorer
from ctr_ensemble.serving.server import TritonServer
from ctr_ensemble.models import checkpoint
from ctr_ensemble.models.predict import predict
from ctr_ensemble.training.config import TrainConfig
from ctr_ensemble.training.member import train_member

from .conftest import TINY_MODEL

pytestmark = pytest.mark.integration
CLI = str(Path(sys.executable).parent / "ctr-ensemble")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_data, tiny_spec, tiny_arrays, tiny_checkpoints):
    d = tmp_path_factory.mktemp("fitted")
    weak = train_member("weak", "deepfm", models.make_config("deepfm", TINY_MODEL["deepfm"]), tiny_spec, tiny_arrays["train"],
                        tiny_arrays["val"], TrainConfig(epochs=1, batch_size=256, seed=5, max_steps=1))
    cks = [checkpoint.load(checkpoint.save(c, d / f"{c.name}.pt")) for c in (weak, *tiny_checkpoints)]
    args = [a for c in cks for a in ("--checkpoint", c.source)]
    r = subprocess.run([CLI, "export", *args, "--repository", d / "repo", "--fit-fusion", tiny_data / "val.tsv",
                        "--fusion-report-data", tiny_data / "test.tsv", "--parity-data", tiny_data / "val.tsv",
                        "--fusion-kind", "cpu", "--max-batch-size", "256"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| fitted |" in r.stdout and "fusion fitted (τ=" in r.stdout
    with TritonServer(d / "repo") as server:
        yield server, d / "repo", cks


def test_fitted_rule_is_no_worse_than_the_best_member_on_validation(fitted):
    _, repo, _ = fitted
    fusion = read_manifest(repo)["fusion"]
    assert fusion["mode"] == "fitted" and len(fusion["priors"]) == 3
    rows = {r["name"]: r for r in fusion["fit"]["report"]["rows"]}
    best = rows[fusion["fit"]["report"]["best_member"]]
    assert best["name"] != "weak" and rows["weak"]["val"]["auc"] < best["val"]["auc"]
    val = {name: r["val"]["logloss"] for name, r in rows.items()}
    assert val["fitted"] <= best["val"]["logloss"] and val["fitted"] <= val["negation_entropy τ=1"] and val["fitted"] <= val["mean"]
    assert {"auc", "logloss", "calibration"} <= set(rows["fitted"]["test"])
    assert fusion["parity"]["prob_max_abs_diff"] <= 1e-5


def _rows(arrays, spec):
    feeds = arrays["test"].feeds(slice(0, 192))
    stress = onnx_export.stress_rows(feeds, spec, max_rows=64)  # OOV ids, NaN/±Inf numerics
    return {k: np.concatenate([feeds[k], stress[k]]) for k in feeds}


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_fitted_fusion_equals_the_rule_over_pytorch_members(fitted, tiny_arrays, tiny_spec, protocol):
    server, repo, cks = fitted
    feeds = _rows(tiny_arrays, tiny_spec)
    out = TritonScorer(server.http_url if protocol == "http" else server.grpc_url, protocol).infer(
        ENSEMBLE_NAME, feeds, outputs=("prob", "weights"))
    probs = torch.from_numpy(np.stack([predict(c.build(), feeds) for c in cks], axis=1))
    fused, w = manifest_rule(read_manifest(repo)).fuse(probs)
    np.testing.assert_allclose(out["prob"], fused.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["weights"], w.numpy(), atol=1e-5, rtol=0)


def test_evaluate_and_load_test_references_know_the_fitted_rule(fitted, tiny_data):
    server, repo, _ = fitted
    summary = evaluate(tiny_data / "test.tsv", repo, ["torch", "onnx", "triton_http", "triton_grpc"],
                       EvalTargets(server.http_url, server.grpc_url, batch_size=200))
    assert summary["fusion"]["mode"] == "fitted" and summary["fusion"]["priors"] == read_manifest(repo)["fusion"]["priors"]
    for b, r in summary["ensemble"].items():
        assert r["max_abs_diff"] <= 1e-5, b
    for b in ("triton_http", "triton_grpc"):
        assert summary["ensemble"][b]["fusion_max_abs_diff"] <= 1e-6
    rows = load_rows(tiny_data / "test.tsv", repo, ENSEMBLE_NAME, inputs_from_config(repo, ENSEMBLE_NAME), 1000)
    offline = OfflineReference().predict(repo, ENSEMBLE_NAME, rows)
    served = TritonScorer(server.grpc_url, "grpc").score(ENSEMBLE_NAME, {k: v for k, v in rows.items() if k != "label"}, 256)
    np.testing.assert_allclose(served, offline, atol=1e-5, rtol=0)
    assert json.loads((repo / "repository.json").read_text())["fusion"]["fit"]["val_data"] == str(tiny_data / "val.tsv")
