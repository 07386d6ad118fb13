"""Every registry member: check-export passes, and all members together form a served ensemble with parity."""

import numpy as np
import pytest
import torch

from ctr_ensemble import models
from ctr_ensemble.evaluation import check_export
from ctr_ensemble.export import onnx_export
from ctr_ensemble.export.repository import RepoOptions, write_repository
from ctr_ensemble.layers.fusion import fuse
from ctr_ensemble.serving.client import TritonScorer
from ctr_ensemble.serving.server import TritonServer
from ctr_ensemble.models import checkpoint
from ctr_ensemble.training.config import TrainConfig
from ctr_ensemble.training.member import train_member
from tests.conftest import TINY_MODEL


@pytest.mark.parametrize("arch", sorted(models.REGISTRY))
def test_check_export_passes_for_every_member(arch):
    res = check_export.run(arch, None, None, TINY_MODEL[arch], rows=1000, steps=5)
    assert res["passed"], res
    assert res["oov_nan"]["rows"] == 1000 and res["batch_1"]["rows"] == 1
    assert {"seq_len_0", "seq_len_1", "seq_len_max"} <= set(res["cases"])  # every member takes a history


def test_check_export_on_a_user_checkpoint(tiny_checkpoints):
    res = check_export.run(None, tiny_checkpoints[1].source, None, None, rows=500)
    assert res["passed"] and res["arch"] == "dcnv2"


@pytest.mark.integration
def test_all_members_serve_as_one_ensemble_with_parity(tmp_path, tiny_spec, tiny_arrays):
    cks = []
    for arch in sorted(models.REGISTRY):
        ck = train_member(arch, arch, models.make_config(arch, TINY_MODEL[arch]), tiny_spec, tiny_arrays["train"],
                          tiny_arrays["val"], TrainConfig(epochs=1, max_steps=10, batch_size=256, seed=2))
        cks.append(checkpoint.load(checkpoint.save(ck, tmp_path / f"{arch}.pt")))
    repo = tmp_path / "repo"
    write_repository(cks, repo, RepoOptions(max_batch_size=512, tau=0.5, fusion_kind="cpu"))
    te = tiny_arrays["test"]
    stress = onnx_export.stress_rows(te.feeds(), tiny_spec, max_rows=300)
    ref = {ck.name: onnx_export.run_onnx(onnx_export.session(repo / ck.name / "1" / "model.onnx"), stress)[0] for ck in cks}
    fused = fuse(torch.from_numpy(np.stack([ref[ck.name] for ck in cks], 1)), tau=0.5)[0][:, 0].numpy()
    with TritonServer(repo) as server:
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            scorer = TritonScorer(url, protocol)
            for ck in cks:
                np.testing.assert_allclose(scorer.score(ck.name, stress, 128), ref[ck.name], atol=1e-5, rtol=0)
            np.testing.assert_allclose(scorer.score("ctr_ensemble", stress, 128), fused, atol=1e-5, rtol=0)
            scorer.close()
