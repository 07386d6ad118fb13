"""The repository validator: every way a repository can be broken is named before Triton starts."""

import shutil

import pytest

from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import validate


@pytest.fixture
def repo(tmp_path, tiny_repo):
    dest = tmp_path / "repo"
    shutil.copytree(tiny_repo, dest)
    return dest


def _edit(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


BREAKS = {
    "onnx_garbage": (lambda r: (r / "dcnv2/1/model.onnx").write_bytes(b"not onnx"), "dcnv2/1/model.onnx: checksum differs"),
    "onnx_missing": (lambda r: (r / "deepfm/1/model.onnx").unlink(), "deepfm/1/model.onnx: missing"),
    "config_garbage": (lambda r: (r / "deepfm/config.pbtxt").write_text("name: {{{"), "deepfm/config.pbtxt: not a valid Triton model config"),
    "config_missing": (lambda r: (r / "dcnv2/config.pbtxt").unlink(), "dcnv2/config.pbtxt: missing"),
    "wrong_name": (lambda r: _edit(r / "deepfm/config.pbtxt", 'name: "deepfm"', 'name: "other"'), "differs from its folder"),
    "wrong_dtype": (lambda r: _edit(r / "deepfm/config.pbtxt", "TYPE_INT64", "TYPE_INT32"), "'cat_ids' is TYPE_INT32 but model.onnx has TYPE_INT64"),
    "wrong_dims": (lambda r: _edit(r / "deepfm/config.pbtxt", "dims: 26", "dims: 25"), "'cat_ids' has dims [25]"),
    "unknown_input": (lambda r: _edit(r / "deepfm/config.pbtxt", 'name: "num"', 'name: "numbers"'), "input 'numbers' is not in model.onnx"),
    "fusion_syntax": (lambda r: (r / "fusion/1/model.py").write_text("def broken(:\n"), "fusion/1/model.py: does not compile"),
    "fusion_math_missing": (lambda r: (r / "fusion/1/ctr_fusion.py").unlink(), "fusion/1/ctr_fusion.py: missing"),
    "ensemble_step": (lambda r: _edit(r / "ctr_ensemble/config.pbtxt", 'model_name: "dcnv2"', 'model_name: "dcnv3"'), "step model 'dcnv3' is not in the repository"),
    "spec_garbage": (lambda r: (r / "deepfm/feature_spec.json").write_text("{"), "feature spec is not valid JSON"),
    # the ensemble is checked against its feature spec too: a dynamic dim would let any request width through
    "unbounded_dims": (lambda r: _edit(r / "ctr_ensemble/config.pbtxt", "dims: 26", "dims: -1"),
                       "ctr_ensemble/config.pbtxt: input 'cat_ids' has dims [-1], the feature spec's are [26] (unbounded"),
}


def test_a_fresh_export_is_valid(repo):
    assert validate.validate(repo) == []


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_each_break_is_named(repo, case):
    brk, expected = BREAKS[case]
    brk(repo)
    problems = validate.validate(repo)
    assert any(expected in p for p in problems), problems
    with pytest.raises(CtrError, match="problem"):
        validate.check(repo)


def test_not_a_repository(tmp_path):
    assert "no */config.pbtxt" in validate.validate(tmp_path)[0]
    assert "no such model repository" in validate.validate(tmp_path / "nope")[0]


def test_cli_check_repo(repo):
    import subprocess
    import sys
    from pathlib import Path

    cli = str(Path(sys.executable).parent / "ctr-ensemble")
    ok = subprocess.run([cli, "check-repo", "--repository", str(repo)], capture_output=True, text=True)
    assert ok.returncode == 0 and "OK (4 models)" in ok.stdout
    (repo / "dcnv2/1/model.onnx").write_bytes(b"x")
    bad = subprocess.run([cli, "check-repo", "--repository", str(repo)], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: ") and "dcnv2/1/model.onnx" in bad.stderr
