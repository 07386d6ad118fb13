"""Integration: server start/stop, fusion parameters taken from config.pbtxt, failures that name the model."""

import shutil

import numpy as np
import pytest
import torch

from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import onnx_export
from ctr_ensemble.export.repository import RepoOptions, write_repository
from ctr_ensemble.layers.fusion import FusionRule
from ctr_ensemble.serving.client import TritonScorer
from ctr_ensemble.serving.server import TritonServer, free_ports

pytestmark = pytest.mark.integration


def _reference(repo, names, cat, num, rule):
    probs = [onnx_export.run_onnx(onnx_export.session(repo / n / "1" / "model.onnx"), {"cat_ids": cat, "num": num})[0] for n in names]
    return rule.fuse(torch.from_numpy(np.stack(probs, 1)))


def _options(rule, **kw):
    return RepoOptions(fusion_mode=rule.mode, tau=rule.tau, priors=None if rule.priors is None else list(rule.priors),
                       space=rule.space, **kw)


RULES = {"mean": FusionRule("mean"), "ne_0.05": FusionRule("negation_entropy", 0.05),
         "fitted_logit": FusionRule("fitted", 0.7, [0.4, -0.3], "logit")}


@pytest.mark.parametrize("rule", list(RULES.values()), ids=list(RULES))
def test_fusion_parameters_come_from_the_config(tmp_path, tiny_checkpoints, tiny_arrays, rule):
    repo = tmp_path / "repo"
    write_repository(tiny_checkpoints, repo, _options(rule, fusion_kind="cpu"))
    te = tiny_arrays["test"]
    cat, num = te.cat_ids[:300], te.num[:300]
    server = TritonServer(repo).start()
    try:
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            out = TritonScorer(url, protocol).infer("ctr_ensemble", {"cat_ids": cat, "num": num}, outputs=("prob", "weights"))
            fused, w = _reference(repo, ["deepfm", "dcnv2"], cat, num, rule)
            np.testing.assert_allclose(out["prob"], fused.numpy(), atol=1e-6, rtol=0)
            np.testing.assert_allclose(out["weights"], w.numpy(), atol=1e-6, rtol=0)
    finally:
        assert server.stop() == 0  # SIGTERM → clean exit
    assert not server.is_running()


def test_a_broken_model_fails_start_with_the_model_named(tmp_path, tiny_repo):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    (repo / "dcnv2" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    with pytest.raises(CtrError) as err:  # Triton itself (strict readiness), validator off
        TritonServer(repo, startup_timeout=120, validate_repository=False).start()
    msg = str(err.value)
    assert "dcnv2" in msg and "tritonserver" in msg
    with pytest.raises(CtrError, match=r"dcnv2/1/model.onnx: checksum differs"):  # the validator, before any start
        TritonServer(repo).start()


def test_start_refuses_a_folder_that_is_not_a_repository(tmp_path):
    with pytest.raises(CtrError, match="not a model repository"):
        TritonServer(tmp_path).start()


def test_free_ports_are_distinct():
    ports = free_ports(20)
    assert len(set(ports)) == 20


def test_a_picked_port_taken_before_triton_binds_it_is_picked_again(tmp_path, tiny_repo, monkeypatch):
    """free_ports() closes its sockets; another process may bind one of the ports before tritonserver does
    (seconds later, after loading the models). start() sees Triton's "already in use" and starts on new ports;
    a port the caller chose is never changed (the same conflict is then an error)."""
    import socket

    from ctr_ensemble.serving import server as srv

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    busy = squatter.getsockname()[1]
    real, calls = srv.free_ports, []

    def first_pick_is_taken(n):
        calls.append(n)
        return [busy, *real(n - 1)] if len(calls) == 1 else real(n)

    repo = tmp_path / "repo"  # one member: three starts of it take a third of the time of the whole ensemble's
    (repo / "deepfm").mkdir(parents=True)
    shutil.copytree(tiny_repo / "deepfm", repo / "deepfm", dirs_exist_ok=True)
    monkeypatch.setattr(srv, "free_ports", first_pick_is_taken)
    try:
        server = TritonServer(repo).start()
        try:
            assert len(calls) == 2 and busy not in (server.http_port, server.grpc_port, server.metrics_port)
            assert TritonScorer(server.http_url).infer("deepfm", {"cat_ids": np.zeros((1, 26), np.int64),
                                                                  "num": np.zeros((1, 13), np.float32)})["prob"].shape == (1, 1)
        finally:
            server.stop()
        with pytest.raises(srv.PortInUse, match="already in use"):
            TritonServer(repo, http_port=busy).start()
    finally:
        squatter.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fusion on KIND_GPU)")
@pytest.mark.parametrize("rule", [FusionRule("negation_entropy", 1.0), RULES["fitted_logit"],
                                  FusionRule("fitted", 0.3, [0.0, -0.8], "prob")], ids=["ne", "fitted_logit", "fitted_prob"])
def test_fusion_on_gpu_matches_reference(tmp_path, tiny_checkpoints, tiny_arrays, rule):
    repo = tmp_path / "repo"
    write_repository(tiny_checkpoints, repo, _options(rule, fusion_kind="gpu"))
    assert "KIND_GPU" in (repo / "fusion" / "config.pbtxt").read_text()
    te = tiny_arrays["test"]
    with TritonServer(repo) as server:
        out = TritonScorer(server.http_url, "http").infer("ctr_ensemble", te.feeds(slice(0, 500)))
    fused, _ = _reference(repo, ["deepfm", "dcnv2"], te.cat_ids[:500], te.num[:500], rule)
    np.testing.assert_allclose(out["prob"], fused.numpy(), atol=1e-5, rtol=0)
