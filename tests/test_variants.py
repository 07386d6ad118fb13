"""Deployment variants (export.variants): written, validated, reconfigured, loaded and referenced like the ensemble."""

import json
import os

import numpy as np
import pytest

from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import onnx_export, reference, validate
from ctr_ensemble.export.repository import RepoOptions, read_config, reconfigure_repository
from ctr_ensemble.export.served import VARIANT_MODELS, variant_models
from ctr_ensemble.layers.fusion import FusionRule
from ctr_ensemble.loadtest.rows import OfflineReference
from ctr_ensemble.metrics import PARITY_TOL
from ctr_ensemble.serving.server import TritonServer

MEMBERS = ["deepfm", "dcnv2"]


def _fused(repo, feeds):
    sess = onnx_export.session(repo / "ctr_all_onnx" / "1" / "model.onnx")
    return sess.run(["prob", "weights"], {i.name: feeds[i.name] for i in sess.get_inputs()})


def _reference(repo, feeds, rule):
    outs = {m: reference.member_outputs(repo / m / "1" / "model.onnx", feeds) for m in MEMBERS}
    return reference.Fusion.of_members(MEMBERS, rule).fuse(outs)


def test_export_writes_both_variants_valid_and_parity_checked(variants_repo, tiny_arrays):
    manifest = json.loads((variants_repo / "repository.json").read_text())
    assert set(manifest["variants"]) == set(VARIANT_MODELS)
    assert manifest["variants"]["all_onnx"]["parity"]["prob_max_abs_diff"] <= PARITY_TOL
    assert manifest["options"]["variants"] == ["single_hop", "all_onnx"]
    assert validate.validate(variants_repo) == []
    hop = read_config(variants_repo / "ctr_single_hop")
    assert hop.backend == "python" and json.loads(hop.parameters["members"].string_value) == MEMBERS
    assert [i.name for i in hop.input] == [i.name for i in read_config(variants_repo / "ctr_ensemble").input]
    for m in MEMBERS:  # the single hop serves the members' own files, not copies that could drift
        assert os.stat(variants_repo / "ctr_single_hop" / "1" / f"{m}.onnx").st_ino == os.stat(variants_repo / m / "1" / "model.onnx").st_ino
    onnx_cfg = read_config(variants_repo / "ctr_all_onnx")
    assert onnx_cfg.backend == "onnxruntime" and [o.name for o in onnx_cfg.output] == ["prob", "weights"]
    feeds = tiny_arrays["test"].feeds(slice(0, 300))
    prob, weights = _fused(variants_repo, feeds)
    ref_prob, ref_w = _reference(variants_repo, feeds, FusionRule())
    np.testing.assert_allclose(prob[:, 0], ref_prob, atol=PARITY_TOL, rtol=0)
    np.testing.assert_allclose(weights, ref_w, atol=PARITY_TOL, rtol=0)


def test_server_loads_the_variants_beside_the_ensemble(variants_repo, tmp_path):
    assert sorted(variant_models(variants_repo)) == sorted(VARIANT_MODELS.values())
    flags = TritonServer(variants_repo).flags()
    assert "--load-model=ctr_ensemble" in flags
    assert {f"--load-model={m}" for m in VARIANT_MODELS.values()} <= set(flags)
    reconfigure_repository(variants_repo, tmp_path / "plain", RepoOptions(max_batch_size=256, fusion_kind="cpu"))
    assert variant_models(tmp_path / "plain") == []
    assert not any((tmp_path / "plain" / m).exists() for m in VARIANT_MODELS.values())
    assert not any(f.startswith("--load-model=ctr_single") for f in TritonServer(tmp_path / "plain").flags())


def test_reconfigure_rebuilds_the_all_onnx_graph_for_another_rule(variants_repo, tiny_arrays, tmp_path):
    dst = tmp_path / "mean"
    manifest = reconfigure_repository(variants_repo, dst, RepoOptions(max_batch_size=256, fusion_kind="cpu", fusion_mode="mean",
                                                                  variants=["all_onnx", "single_hop"]))
    assert set(manifest["variants"]) == {"all_onnx", "single_hop"}
    assert validate.validate(dst) == []
    assert read_config(dst / "ctr_single_hop").parameters["fusion_mode"].string_value == "mean"
    feeds = tiny_arrays["test"].feeds(slice(0, 100))
    prob, weights = _fused(dst, feeds)
    np.testing.assert_allclose(weights, 0.5, atol=1e-7)
    np.testing.assert_allclose(prob[:, 0], _reference(dst, feeds, FusionRule("mean"))[0], atol=PARITY_TOL, rtol=0)
    # the offline reference of a variant is the ensemble's (members + rule), never the variant's own graph
    ref = OfflineReference().predict(dst, "ctr_all_onnx", feeds)
    np.testing.assert_allclose(ref, OfflineReference().predict(dst, "ctr_ensemble", feeds), atol=0, rtol=0)


def test_bad_variant_options_are_refused_with_the_reason():
    with pytest.raises(CtrError, match="unknown deployment variant"):
        RepoOptions(variants=["two_hop"]).validate()
    with pytest.raises(CtrError, match="unique"):
        RepoOptions(variants=["all_onnx", "all_onnx"]).validate()
    with pytest.raises(CtrError, match="collaborative"):
        RepoOptions(fusion_mode="collaborative", variants=["all_onnx"]).validate()


def test_validator_reports_a_single_hop_without_its_member_files(variants_repo, tmp_path):
    dst = tmp_path / "broken"
    reconfigure_repository(variants_repo, dst, RepoOptions(max_batch_size=256, fusion_kind="cpu", variants=["single_hop"]))
    (dst / "ctr_single_hop" / "1" / "dcnv2.onnx").unlink()
    problems = validate.validate(dst)
    assert any("dcnv2.onnx: missing" in p for p in problems), problems
