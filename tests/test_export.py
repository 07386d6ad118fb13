import json

import numpy as np
import onnx
import pytest

from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import onnx_export, repository
from ctr_ensemble.export.repository import RepoOptions, write_repository


def test_repository_layout(tiny_repo):
    manifest = json.loads((tiny_repo / "repository.json").read_text())
    assert list(manifest["members"]) == ["deepfm", "dcnv2"]
    for m in ("deepfm", "dcnv2"):
        assert (tiny_repo / m / "1" / "model.onnx").is_file()
        cfg = (tiny_repo / m / "config.pbtxt").read_text()
        assert 'backend: "onnxruntime"' in cfg and "dynamic_batching" in cfg and "count: 1" in cfg
        assert "max_batch_size: 256" in cfg
        assert (tiny_repo / m / "feature_spec.json").is_file()
    fusion = (tiny_repo / "fusion" / "config.pbtxt").read_text()
    assert 'backend: "python"' in fusion and "fusion_mode" in fusion and "tau" in fusion
    assert (tiny_repo / "fusion" / "1" / "model.py").is_file() and (tiny_repo / "fusion" / "1" / "ctr_fusion.py").is_file()
    ens = (tiny_repo / "ctr_ensemble" / "config.pbtxt").read_text()
    assert 'platform: "ensemble"' in ens and ens.count("model_name") == 3


def test_onnx_contract_dynamic_batch_and_checker(tiny_repo, tiny_checkpoints, tiny_arrays):
    path = tiny_repo / "deepfm" / "1" / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    sess = onnx_export.session(path)
    ins = {i.name: (i.type, i.shape) for i in sess.get_inputs()}
    assert ins["cat_ids"][0] == "tensor(int64)" and ins["num"][0] == "tensor(float)"
    assert ins["cat_ids"][1][1] == 26 and ins["num"][1][1] == 13
    assert [o.name for o in sess.get_outputs()] == ["prob", "repr"]
    model = tiny_checkpoints[0].build()
    te = tiny_arrays["test"]
    for b in (1, 7, 1000):
        par = onnx_export.parity(model, sess, te.feeds(slice(0, b)))
        assert par["prob_max_abs_diff"] <= 1e-5 and par["repr_max_abs_diff"] <= 1e-5


def test_onnx_maps_out_of_range_ids_to_oov_and_handles_nan(tiny_repo, tiny_checkpoints, tiny_arrays):
    te = tiny_arrays["test"]
    for ck in tiny_checkpoints:
        sess = onnx_export.session(tiny_repo / ck.name / "1" / "model.onnx")
        stress = onnx_export.stress_rows(te.feeds(), ck.spec)
        cat, num = stress["cat_ids"], stress["num"]
        assert (cat < 0).any() and (cat >= max(ck.spec.cat_sizes)).any() and np.isnan(num).any()
        p, h = onnx_export.run_onnx(sess, stress)
        assert np.isfinite(p).all() and np.isfinite(h).all()
        par = onnx_export.parity(ck.build(), sess, stress)
        assert par["prob_max_abs_diff"] <= 1e-5


def test_failed_export_leaves_previous_repository_intact(tmp_path, tiny_checkpoints, monkeypatch):
    repo = tmp_path / "repo"
    write_repository(tiny_checkpoints, repo, RepoOptions())
    before = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    calls = {"n": 0}
    real = onnx_export.export_member

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(onnx_export, "export_member", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        write_repository(tiny_checkpoints, repo, RepoOptions(tau=0.5))
    after = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    assert after == before
    assert not list(tmp_path.glob("repo.staging-*")) and not list(tmp_path.glob("repo.old-*"))


def test_rejects_duplicate_reserved_and_mismatched_members(tmp_path, tiny_checkpoints):
    a, b = tiny_checkpoints
    with pytest.raises(CtrError, match="unique"):
        write_repository([a, a], tmp_path / "r", RepoOptions())
    reserved = type(a)(**{**a.__dict__, "name": "fusion"})
    with pytest.raises(CtrError, match="reserved"):
        write_repository([reserved, b], tmp_path / "r", RepoOptions())
    other_spec = type(b.spec)(**{**b.spec.__dict__, "min_count": 99})
    with pytest.raises(CtrError, match="different feature specs"):
        write_repository([a, type(b)(**{**b.__dict__, "spec": other_spec})], tmp_path / "r", RepoOptions())
    with pytest.raises(CtrError, match="fusion mode"):
        write_repository([a, b], tmp_path / "r", RepoOptions(fusion_mode="vote"))
    assert not (tmp_path / "r").exists()


def test_fusion_kind_resolution():
    assert repository.resolve_fusion_kind("cpu") == "cpu"
    assert repository.resolve_fusion_kind("auto") in ("cpu", "gpu")
    with pytest.raises(CtrError):
        repository.resolve_fusion_kind("tpu")


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/b", ".hidden", "..", "", "a b", "a\\b", "ünï", "x;rm"])
def test_member_names_that_would_escape_or_mangle_a_path_are_refused(bad, tmp_path, tiny_checkpoints):
    from typer.testing import CliRunner

    from ctr_ensemble.cli import app
    from ctr_ensemble.files import check_name

    a, b = tiny_checkpoints
    renamed = type(a)(**{**a.__dict__, "name": bad})
    with pytest.raises(CtrError, match="is not a valid model name"):
        write_repository([renamed, b], tmp_path / "r", RepoOptions())
    assert not (tmp_path / "r").exists() and not list(tmp_path.iterdir())  # nothing written, inside or out
    r = CliRunner().invoke(app, ["train", "--model", "deepfm", "--name", bad, "--train", "t", "--val", "v",
                                 "--out", str(tmp_path / "m.pt")])
    assert isinstance(r.exception, CtrError) and "train --name: " in str(r.exception), r.output
    assert "is not a valid model name" in str(r.exception) and not (tmp_path / "m.pt").exists()
    for good in ("deepfm", "deepfm_2", "DCN-v2.1", "_x", "0a"):
        assert check_name(good, "x") == good


def test_request_limits_are_recorded_and_an_unbounded_repository_is_bounded_by_reconfigure(tmp_path, tiny_repo):
    import shutil

    from ctr_ensemble.export import validate
    from ctr_ensemble.export.repository import RepoOptions, read_manifest, reconfigure_repository

    assert RepoOptions().max_batch_size == 1024
    # 26 int64 ids + 13 fp32 numbers a row; JSON text at most 24 bytes an element; 2x headroom + 64 KiB
    assert read_manifest(tiny_repo)["limits"] == {
        "max_batch_size": 256, "seq_max_len": None, "row_elements": 39, "row_bytes": 26 * 8 + 13 * 4,
        "max_binary_request_bytes": 256 * 260, "max_json_request_bytes": 256 * 39 * 24,
        "max_request_bytes": 2 * 256 * 39 * 24 + 64 * 1024}
    old = tmp_path / "old"  # as exported before the dims were fixed (seq_ids had [-1]; here cat_ids stands in)
    shutil.copytree(tiny_repo, old)
    for m in ("deepfm", "ctr_ensemble"):
        cfg = old / m / "config.pbtxt"
        cfg.write_text(cfg.read_text().replace("dims: 26", "dims: -1", 1))
    assert any("unbounded" in p for p in validate.validate(old))
    manifest = reconfigure_repository(old, tmp_path / "new", RepoOptions(max_batch_size=512, fusion_kind="cpu"))
    assert validate.validate(tmp_path / "new") == []
    assert manifest["limits"]["max_batch_size"] == 512 and manifest["limits"]["max_binary_request_bytes"] == 512 * 260


def test_reconfigure_refuses_a_tampered_member_name(tmp_path, tiny_checkpoints):
    repo = tmp_path / "repo"
    write_repository(tiny_checkpoints, repo, RepoOptions())
    m = json.loads((repo / "repository.json").read_text())
    m["members"] = {"../../escaped" if k == tiny_checkpoints[0].name else k: v for k, v in m["members"].items()}
    (repo / "repository.json").write_text(json.dumps(m))
    with pytest.raises(CtrError, match="repository.json: member name: '../../escaped' is not a valid model name"):
        repository.reconfigure_repository(repo, tmp_path / "out", RepoOptions(tau=0.5))
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "escaped").exists()
