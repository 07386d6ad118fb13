"""LR (FuxiCTR's ``LR``): first-order only, so the logit is additive over fields; exported with parity."""

import pytest
import torch

from ctr_ensemble import metrics, models
from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import onnx_export
from ctr_ensemble.training import search_space
from ctr_ensemble.training.config import TrainConfig
from ctr_ensemble.training.member import train_member
from tests.conftest import TINY_MODEL


def _logit(model, cat, num):
    return model.logits(cat, num)[0][:, 0]  # (B,)


def test_starts_as_fuxictrs_sum_of_weights_plus_bias(tiny_spec, tiny_arrays):
    torch.manual_seed(0)
    model = models.build("lr", models.make_config("lr", TINY_MODEL["lr"]), tiny_spec).eval()
    te = tiny_arrays["test"]
    cat, num = torch.from_numpy(te.cat_ids[:64].copy()), torch.from_numpy(te.num[:64].copy())
    with torch.no_grad():
        prob, h = model(cat, num)
    assert h.shape == (64, tiny_spec.n_cat + tiny_spec.n_num)  # one first-order term per field
    torch.testing.assert_close(prob[:, 0], torch.sigmoid(h.sum(1)))


def test_trained_logit_is_additive_over_fields_and_exports_with_parity(tiny_spec, tiny_arrays, tmp_path):
    tr, va = tiny_arrays["train"], tiny_arrays["val"]
    ck = train_member("lr", "lr", models.make_config("lr", TINY_MODEL["lr"]), tiny_spec, tr, va,
                      TrainConfig(epochs=1, batch_size=256, max_steps=20, seed=1))
    model = ck.build().eval()
    # No interactions: swapping one half of the fields between two rows leaves the sum of their logits.
    a, b = slice(0, 100), slice(100, 200)
    cat, num = torch.from_numpy(va.cat_ids.copy()), torch.from_numpy(va.num.copy())
    k = tiny_spec.n_cat // 2
    mix_cat = torch.cat([cat[a][:, :k], cat[b][:, k:]], 1), torch.cat([cat[b][:, :k], cat[a][:, k:]], 1)
    with torch.no_grad():
        lhs = _logit(model, cat[a], num[a]) + _logit(model, cat[b], num[b])
        rhs = _logit(model, mix_cat[0], num[a]) + _logit(model, mix_cat[1], num[b])
    torch.testing.assert_close(lhs, rhs, atol=1e-5, rtol=0)  # deepfm: ~1e-2
    path = onnx_export.export_member(model, tiny_spec, tmp_path / "m.onnx")
    stress = onnx_export.stress_rows(va.feeds(), tiny_spec, seed=0, max_rows=256)
    par = onnx_export.parity(model, onnx_export.session(path), stress)
    assert par["prob_max_abs_diff"] <= metrics.PARITY_TOL, par


@pytest.mark.parametrize("over, needle", [({"embedding_dim": 8}, "embedding_dim must be 1"),
                                          ({"batch_norm": True}, "batch_norm must be false")])
def test_settings_that_do_not_apply_are_errors(over, needle, tiny_spec):
    with pytest.raises(CtrError, match=needle):
        models.build("lr", models.make_config("lr", over), tiny_spec)


def test_shipped_search_space_has_no_tower_keys():
    space = search_space.load("lr")
    keys = {p.key for p in space.params}
    assert not keys & {"hidden", "dropout"}
    assert space.fixed()[0] == {"embedding_dim": 1, "batch_norm": False}
