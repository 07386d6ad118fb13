"""Model-specific checks for the classic members DCN, IPNN and FiBiNET and their layers."""

import numpy as np
import pytest
import torch

from ctr_ensemble import models
from ctr_ensemble.data.spec import slice_feeds
from ctr_ensemble.errors import CtrError
from ctr_ensemble.export import onnx_export
from ctr_ensemble.layers.interaction import BILINEAR_TYPES, Bilinear, CrossNetV1, InnerProduct, SENet
from tests.conftest import TINY_MODEL

CLASSIC = ("dcn", "pnn", "fibinet")


def test_inner_product_equals_double_loop():
    torch.manual_seed(0)
    e = torch.randn(5, 7, 3)
    naive = torch.stack([(e[:, i] * e[:, j]).sum(-1) for i in range(7) for j in range(i + 1, 7)], dim=1)
    out = InnerProduct(7)(e)
    assert out.shape == (5, 21) and InnerProduct(7).n_pairs == 21
    torch.testing.assert_close(out, naive)


def test_cross_net_v1_matches_formula():
    torch.manual_seed(0)
    net = CrossNetV1(6, 3)
    with torch.no_grad():
        net.bias.normal_()
    x0 = torch.randn(4, 6)
    x = x0
    for w, b in zip(net.weight, net.bias):
        x = x0 * (x * w).sum(1, keepdim=True) + b + x  # x_{l+1} = x0 (x_lᵀ w_l) + b_l + x_l
    torch.testing.assert_close(net(x0), x)
    assert sum(p.numel() for p in net.parameters()) == 2 * 3 * 6  # rank-one: 2d per layer


def test_senet_weights_shape_and_sign():
    torch.manual_seed(0)
    a = SENet(10, reduction_ratio=3)(torch.randn(8, 10, 4))
    assert a.shape == (8, 10)
    assert (a >= 0).all() and (a > 0).any()


@pytest.mark.parametrize("kind", BILINEAR_TYPES)
def test_bilinear_equals_double_loop(kind):
    torch.manual_seed(0)
    f, d = 5, 3
    layer = Bilinear(f, d, kind)
    e = torch.randn(4, f, d)
    w = layer.weight
    pairs = [(i, j) for i in range(f) for j in range(i + 1, f)]
    pick = {"field_all": lambda i, k: w[0], "field_each": lambda i, k: w[i], "field_interaction": lambda i, k: w[k]}[kind]
    naive = torch.stack([(e[:, i] @ pick(i, k)) * e[:, j] for k, (i, j) in enumerate(pairs)], dim=1)
    torch.testing.assert_close(layer(e), naive)
    assert w.shape[0] == {"field_all": 1, "field_each": f, "field_interaction": len(pairs)}[kind]


def test_fibinet_rejects_unknown_bilinear_type(tiny_spec):
    with pytest.raises(CtrError, match="bilinear_type"):
        models.build("fibinet", models.make_config("fibinet", {"bilinear_type": "field_pair"}), tiny_spec)


def test_default_configs_build(tiny_spec):
    for arch in CLASSIC:
        model = models.build(arch, models.make_config(arch), tiny_spec)
        assert model.head.in_features == model.repr_dim


EXPORT_CASES = [(a, {}) for a in CLASSIC] + [("fibinet", {"bilinear_type": k}) for k in BILINEAR_TYPES[1:]]


@pytest.mark.parametrize("arch, extra", EXPORT_CASES, ids=[a + "".join(f"-{v}" for v in e.values()) for a, e in EXPORT_CASES])
def test_exports_to_onnx_with_parity_on_stress_rows(arch, extra, tmp_path, tiny_spec, tiny_arrays):
    torch.manual_seed(0)
    over = {**TINY_MODEL[arch], **extra}
    model = models.build(arch, models.make_config(arch, over), tiny_spec).eval()
    with torch.no_grad():  # move away from the near-zero init so the parity check is not vacuous
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = onnx_export.export_member(model, tiny_spec, tmp_path / f"{arch}.onnx")
    sess = onnx_export.session(path)
    te = tiny_arrays["test"]
    stress = onnx_export.stress_rows(te.feeds(), tiny_spec)
    for x in (te.feeds(slice(0, 300)), stress, slice_feeds(stress, 0, 1)):
        p, h = onnx_export.run_onnx(sess, x)
        assert np.isfinite(p).all() and np.isfinite(h).all() and h.shape[1] == model.repr_dim
        par = onnx_export.parity(model, sess, x)
        assert par["prob_max_abs_diff"] <= 1e-5 and par["repr_max_abs_diff"] <= 1e-5, par
