"""Data without numeric fields (Avazu, libSVM): members and the served ensemble take `cat_ids` only."""

import numpy as np
import pytest

from ctr_ensemble import models
from ctr_ensemble.data.encode import Arrays
from ctr_ensemble.data.spec import CategoricalField, FeatureSpec
from ctr_ensemble.export import onnx_export
from ctr_ensemble.export.repository import RepoOptions, write_repository
from ctr_ensemble.serving.client import TritonScorer
from ctr_ensemble.serving.server import TritonServer
from ctr_ensemble.training.config import TrainConfig
from ctr_ensemble.training.member import train_member
from tests.conftest import TINY_MODEL


def _data(n, seed):
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, 30, (n, 6)).astype(np.int64)
    y = (rng.random(n) < np.where(cat[:, 0] % 3 == 0, 0.7, 0.2)).astype(np.float32)
    return Arrays(cat, np.zeros((n, 0), np.float32), y)


@pytest.mark.integration
def test_members_without_numeric_fields_export_and_serve(tmp_path):
    spec = FeatureSpec(categorical=[CategoricalField(f"f{i}", [str(j) for j in range(29)]) for i in range(6)], numeric=[])
    tr, va = _data(3000, 0), _data(500, 1)
    cks = [train_member(a, a, models.make_config(a, TINY_MODEL[a]), spec, tr, va, TrainConfig(epochs=1, batch_size=128))
           for a in ("deepfm", "dcnv2")]
    repo = tmp_path / "repo"
    write_repository(cks, repo, RepoOptions(fusion_kind="cpu"), parity_rows=va.feeds())
    for name in ("deepfm", "ctr_ensemble"):
        cfg = (repo / name / "config.pbtxt").read_text()
        assert '"cat_ids"' in cfg and '"num"' not in cfg
    sess = onnx_export.session(repo / "deepfm" / "1" / "model.onnx")
    assert [i.name for i in sess.get_inputs()] == ["cat_ids"]
    cat = va.cat_ids.copy()
    cat[:5] = -3  # out of range → OOV
    ref = onnx_export.run_onnx(sess, {"cat_ids": cat})[0]
    with TritonServer(repo) as server:
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            served = TritonScorer(url, protocol).score("deepfm", {"cat_ids": cat}, 100)
            np.testing.assert_allclose(served, ref, atol=1e-5, rtol=0)
            assert TritonScorer(url, protocol).score("ctr_ensemble", {"cat_ids": cat}, 100).shape == (500,)
