"""Model-specific checks for DHEN and InterFormer (the generic member checks are in test_models.py)."""

import pytest
import torch

from ctr_ensemble import models
from ctr_ensemble.data.spec import slice_feeds
from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import onnx_export
from tests.conftest import TINY_MODEL


def _build(arch, spec, **over):
    torch.manual_seed(0)
    return models.build(arch, models.make_config(arch, {**TINY_MODEL[arch], **over}), spec)


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_dhen_depth_and_module_set_shape_the_network(tiny_spec):
    one, two = _build("dhen", tiny_spec, n_layers=1), _build("dhen", tiny_spec, n_layers=2)
    assert len(one.layers) == 1 and len(two.layers) == 2 and _n_params(two) > _n_params(one)
    dot = _build("dhen", tiny_spec, modules=["dot"])
    dot_cross = _build("dhen", tiny_spec, modules=["dot", "cross"])
    assert _n_params(dot_cross) > _n_params(dot)
    assert [type(m).__name__ for m in dot_cross.layers[0].branches] == ["DotInteraction", "CrossInteraction"]
    # Compressing the F field tokens to fewer tokens shrinks every module.
    assert _n_params(_build("dhen", tiny_spec, n_tokens=8)) < _n_params(two)


def test_dhen_rejects_bad_configs(tiny_spec):
    with pytest.raises(CtrError, match=r"dhen: unknown modules \['attention'\]"):
        _build("dhen", tiny_spec, modules=["dot", "attention"])
    with pytest.raises(CtrError, match="at least one"):
        _build("dhen", tiny_spec, modules=[])
    with pytest.raises(CtrError, match="repeat"):
        _build("dhen", tiny_spec, modules=["dot", "dot"])
    with pytest.raises(CtrError, match="n_layers must be >= 1"):
        _build("dhen", tiny_spec, n_layers=0)


def test_interformer_runs_without_a_sequence_feature_on_learned_empty_tokens(tiny_spec, tiny_arrays):
    model = _build("interformer", tiny_spec, n_empty_tokens=3)
    assert isinstance(model.empty_tokens, torch.nn.Parameter) and model.empty_tokens.shape == (3, 4)
    assert "empty_tokens" in dict(model.named_parameters())
    tokens, mask = model.sequence_tokens(None, None, torch.zeros(5, 1))
    assert tokens.shape == (5, 3, 4) and mask is None
    tr = tiny_arrays["train"]
    logit, h = model.logits(torch.from_numpy(tr.cat_ids[:32]), torch.from_numpy(tr.num[:32]))
    assert h.shape == (32, model.repr_dim)
    logit.sum().backward()
    assert model.empty_tokens.grad is not None and model.empty_tokens.grad.abs().sum() > 0
    with pytest.raises(CtrError, match="divisible by n_heads"):
        _build("interformer", tiny_spec, n_heads=3)
    with pytest.raises(CtrError, match="interaction_modules"):
        _build("interformer", tiny_spec, interaction_modules=["attention"])
    # The interaction arch is a DHEN layer over the field tokens plus the sequence summary tokens.
    both = _build("interformer", tiny_spec, interaction_modules=["dot", "cross"])
    assert [type(m).__name__ for m in both.layers[0].interaction.branches] == ["DotInteraction", "CrossInteraction"]


@pytest.mark.parametrize("arch", ["dhen", "interformer"])
def test_export_parity_on_real_and_stress_rows(arch, tiny_spec, tiny_arrays, tmp_path):
    model = _build(arch, tiny_spec).eval()
    path = onnx_export.export_member(model, tiny_spec, tmp_path / f"{arch}.onnx")
    sess = onnx_export.session(path)
    te = tiny_arrays["test"]
    stress = onnx_export.stress_rows(te.feeds(), tiny_spec)
    for feeds in [te.feeds(slice(0, 300)), stress, slice_feeds(stress, 0, 1)]:
        res = onnx_export.parity(model, sess, feeds)
        assert res["prob_max_abs_diff"] <= 1e-5 and res["repr_max_abs_diff"] <= 1e-5, res
