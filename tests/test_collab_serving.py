"""Integration: a collaborative ensemble (3 members, learned τ) served by the real tritonserver.

The members run as ONNX models emitting prob and repr; the fusion Python model applies the
confidence weights and the trained head loaded from its version folder. What comes back over
HTTP and gRPC must equal the PyTorch collaborative model to 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp

from ctr_ensemble.evaluation.evaluate import EvalTargets, evaluate
from ctr_ensemble.export import onnx_export
from ctr_ensemble.export.repository import ENSEMBLE_NAME, RepoOptions, write_repository
from ctr_ensemble.layers.fusion import COLLABORATIVE
from ctr_ensemble.serving.server import TritonServer
from ctr_ensemble.models import ensemble
from ctr_ensemble.training import collab, mutual

from .conftest import TINY_MODEL

pytestmark = pytest.mark.integration
ARCHS = ["deepfm", "dcnv2", "deepfm"]


@pytest.fixture(scope="module")
def collab_ck(tmp_path_factory, tiny_spec, tiny_arrays):
    cfg = collab.CollabConfig(epochs=1, batch_size=256, max_steps=20, seed=4, kl_weight=0.1,
                              head=collab.HeadConfig(hidden=[16], tau=0.7, learn_tau=True))
    members = mutual.members_from_archs(ARCHS, {a: TINY_MODEL[a] for a in ARCHS})
    ck = collab.train_collab(members, tiny_spec, tiny_arrays["train"], tiny_arrays["val"], cfg)
    return ensemble.load(ensemble.save(ck, tmp_path_factory.mktemp("collab") / "collab.pt"))


def _repo(tmp_path_factory, ck, arrays, kind="cpu"):
    repo = tmp_path_factory.mktemp("collab_repo") / "model_repository"
    va = arrays["val"]
    write_repository([], repo, RepoOptions(max_batch_size=256, fusion_mode=COLLABORATIVE, fusion_kind=kind),
                     parity_rows=va.feeds(slice(0, 256)), collab=ck)
    return repo


@pytest.fixture(scope="module")
def collab_server(tmp_path_factory, collab_ck, tiny_arrays):
    repo = _repo(tmp_path_factory, collab_ck, tiny_arrays)
    with TritonServer(repo) as s:
        yield s, repo


def _rows(arrays, spec):
    feeds = arrays["test"].feeds(slice(0, 64))
    stress = onnx_export.stress_rows(feeds, spec, max_rows=64)  # OOV ids, NaN/±Inf numerics
    return {k: np.concatenate([feeds[k], stress[k]]) for k in feeds}


def _infer(url, protocol, feeds):
    """One request with inputs named and typed as the served model's metadata says."""
    mod = thttp if protocol == "http" else tgrpc
    client = mod.InferenceServerClient(url)
    try:
        meta = client.get_model_metadata(ENSEMBLE_NAME)
        specs = meta["inputs"] if protocol == "http" else [{"name": i.name, "datatype": i.datatype} for i in meta.inputs]
        inputs = []
        for spec in specs:
            x = mod.InferInput(spec["name"], list(feeds[spec["name"]].shape), spec["datatype"])
            x.set_data_from_numpy(feeds[spec["name"]])
            inputs.append(x)
        r = client.infer(ENSEMBLE_NAME, inputs, outputs=[mod.InferRequestedOutput("prob"), mod.InferRequestedOutput("weights")])
        return r.as_numpy("prob"), r.as_numpy("weights")
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_collaborative_ensemble_equals_pytorch(collab_server, collab_ck, tiny_arrays, tiny_spec, protocol):
    server, repo = collab_server
    feeds = _rows(tiny_arrays, tiny_spec)
    url = server.http_url if protocol == "http" else server.grpc_url
    prob, weights = _infer(url, protocol, feeds)
    fused, w, _ = ensemble.predict_collab(collab_ck.build(), feeds)
    n = len(feeds["cat_ids"])
    assert prob.shape == (n, 1) and weights.shape == (n, 3)
    np.testing.assert_allclose(prob[:, 0], fused, atol=1e-5, rtol=0)
    np.testing.assert_allclose(weights, w, atol=1e-5, rtol=0)
    assert np.isfinite(prob).all()


def test_evaluate_collaborative_repository_all_backends_agree(collab_server, tiny_data):
    server, repo = collab_server
    summary = evaluate(tiny_data / "test.tsv", repo, ["torch", "onnx", "triton_http", "triton_grpc"],
                       EvalTargets(server.http_url, server.grpc_url, batch_size=200))
    assert summary["fusion"]["mode"] == COLLABORATIVE
    for rows in [*summary["members"].values(), summary["ensemble"]]:
        for r in rows.values():
            assert r["max_abs_diff"] <= 1e-5 and 0.5 < r["auc"] < 1
    for b in ("triton_http", "triton_grpc"):
        assert summary["ensemble"][b]["fusion_max_abs_diff"] <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (collaborative fusion on KIND_GPU)")
def test_collaborative_fusion_on_gpu_equals_pytorch(tmp_path_factory, collab_ck, tiny_arrays, tiny_spec):
    repo = _repo(tmp_path_factory, collab_ck, tiny_arrays, kind="gpu")
    assert "KIND_GPU" in (repo / "fusion" / "config.pbtxt").read_text()
    feeds = _rows(tiny_arrays, tiny_spec)
    fused, w, _ = ensemble.predict_collab(collab_ck.build(), feeds)
    with TritonServer(repo) as server:
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            prob, weights = _infer(url, protocol, feeds)
            np.testing.assert_allclose(prob[:, 0], fused, atol=1e-5, rtol=0)
            np.testing.assert_allclose(weights, w, atol=1e-5, rtol=0)
