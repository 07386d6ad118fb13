import math

import numpy as np
import pytest
import torch

from ctr_ensemble.layers.fusion import fuse, fusion_weights, negation_entropy


def test_negation_entropy_exact_at_certainty_and_half():
    p = torch.tensor([0.0, 1.0, 0.5])
    ne = negation_entropy(p)
    assert ne[0].item() == 0.0 and ne[1].item() == 0.0
    assert ne[2].item() == pytest.approx(-math.log(2), abs=1e-7)
    assert torch.isfinite(ne).all()


def test_matches_hand_formula():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.99, (50, 3))
    tau = 0.3
    ne = p * np.log(p) + (1 - p) * np.log(1 - p)
    w = np.exp(ne / tau) / np.exp(ne / tau).sum(1, keepdims=True)
    fused, weights = fuse(torch.from_numpy(p), tau=tau)
    np.testing.assert_allclose(weights.numpy(), w, rtol=1e-10)
    np.testing.assert_allclose(fused[:, 0].numpy(), (w * p).sum(1), rtol=1e-10)


def test_certain_members_get_the_weight_and_p_stays_in_range():
    p = torch.tensor([[0.0, 0.5], [1.0, 0.5], [0.0, 1.0]])
    fused, w = fuse(p, tau=0.1)
    assert w[0, 0] > 0.99 and w[1, 0] > 0.99
    assert torch.allclose(w[2], torch.tensor([0.5, 0.5]))  # both certain: a tie
    assert ((fused >= 0) & (fused <= 1)).all()


def test_ties_share_equally():
    p = torch.tensor([[0.3, 0.7, 0.3]])  # NE is symmetric: all three tie
    w = fusion_weights(p, tau=1.0)
    assert torch.allclose(w, torch.full((1, 3), 1 / 3))


def test_tau_to_zero_picks_most_confident_and_zero_is_argmax():
    p = torch.tensor([[0.45, 0.9, 0.6]])
    w_small = fusion_weights(p, tau=1e-4)
    assert w_small[0, 1] == pytest.approx(1.0, abs=1e-6)
    w_zero = fusion_weights(p, tau=0.0)
    assert w_zero.tolist() == [[0.0, 1.0, 0.0]]
    tie = fusion_weights(torch.tensor([[0.25, 0.75, 0.5]]), tau=0.0)  # exact in binary: a true tie
    assert tie.tolist() == [[0.5, 0.5, 0.0]]


def test_tau_large_is_the_mean_and_mean_mode():
    p = torch.tensor([[0.1, 0.6, 0.95]])
    fused, w = fuse(p, tau=1e9)
    assert torch.allclose(w, torch.full((1, 3), 1 / 3), atol=1e-8)
    mean, w_mean = fuse(p, mode="mean")
    assert mean.item() == pytest.approx(p.mean().item())
    assert fused.item() == pytest.approx(mean.item(), abs=1e-7)


def test_single_member_is_identity():
    p = torch.rand(20, 1)
    fused, w = fuse(p, tau=0.5)
    assert torch.equal(w, torch.ones_like(p))
    assert torch.allclose(fused, p)


def test_rejects_bad_arguments():
    p = torch.rand(4, 2)
    with pytest.raises(ValueError, match="unknown fusion mode"):
        fuse(p, mode="max")
    with pytest.raises(ValueError, match="tau"):
        fuse(p, tau=-1.0)
    with pytest.raises(ValueError, match="batch, members"):
        fuse(torch.rand(4))


# --- NaN-safety: a saturated member (sigmoid = 0 or 1 exactly) -------------------------------------------------


def _old_negation_entropy(p):  # the formula before the fix: xlogy straight on p and 1 - p
    p = p.clamp(0.0, 1.0)
    q = 1.0 - p
    return torch.special.xlogy(p, p) + torch.special.xlogy(q, q)


@pytest.mark.parametrize("dtype,big", [(torch.float32, 20.0), (torch.float32, 120.0), (torch.bfloat16, 8.0)])
def test_saturated_member_gives_finite_gradients(dtype, big):
    # float32: sigmoid(20) == 1 and sigmoid(-120) == 0 exactly; bfloat16 saturates from |logit| ~ 6.
    z = torch.tensor([[big, 0.3], [-big, 1.0], [2.0, -big]], dtype=dtype, requires_grad=True)
    p = torch.sigmoid(z)
    assert p.min() == 0.0 or p.max() == 1.0
    for mode, kw in (("negation_entropy", {"tau": 0.5}), ("fitted", {"tau": 0.5, "priors": [0.0, -0.3]})):
        z.grad = None
        fusion_weights(torch.sigmoid(z), mode, **kw)[:, 0].sum().backward()
        assert torch.isfinite(z.grad).all(), (mode, z.grad)
    ref = z.detach().clone().requires_grad_()
    torch.softmax(_old_negation_entropy(torch.sigmoid(ref)) / 0.5, 1)[:, 0].sum().backward()
    assert torch.isnan(ref.grad).any()  # what the fix removes


def test_negation_entropy_is_bit_identical_away_from_saturation():
    p = torch.cat([torch.rand(100_000), torch.tensor([1e-30, 1e-8, 0.5, 1 - 6e-8])])
    assert torch.equal(negation_entropy(p), _old_negation_entropy(p))
    assert torch.equal(negation_entropy(p.double()), _old_negation_entropy(p.double()))


# --- the fitted rule: w = softmax(a_i + NE(p_i)/τ), probability or logit space ----------------------------------


def test_fitted_rule_matches_hand_formula_in_both_spaces():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.01, 0.99, (40, 3))
    tau, a = 0.4, np.array([0.0, -0.7, 0.25])
    ne = p * np.log(p) + (1 - p) * np.log(1 - p)
    e = np.exp(a + ne / tau)
    w = e / e.sum(1, keepdims=True)
    fused, weights = fuse(torch.from_numpy(p), "fitted", tau, a.tolist(), "prob")
    np.testing.assert_allclose(weights.numpy(), w, rtol=1e-10)
    np.testing.assert_allclose(fused[:, 0].numpy(), (w * p).sum(1), rtol=1e-10)
    fused, _ = fuse(torch.from_numpy(p), "fitted", tau, a.tolist(), "logit")
    want = 1 / (1 + np.exp(-(w * np.log(p / (1 - p))).sum(1)))
    np.testing.assert_allclose(fused[:, 0].numpy(), want, rtol=1e-10)
    # logit space clamps p to [EPS, 1 - EPS]: a certain member gives a large finite logit, not inf
    sat, _ = fuse(torch.tensor([[1.0, 0.5], [0.0, 0.5]]), "fitted", 1.0, [0.0, -1e4], "logit")
    assert torch.isfinite(sat).all() and sat[0, 0] > 0.9999 and sat[1, 0] < 1e-4


def test_fitted_family_contains_ne_mean_and_each_member_exactly():
    p = torch.rand(1000, 3)
    assert torch.equal(fuse(p, "fitted", 1.0, [0.0] * 3)[0], fuse(p, "negation_entropy", 1.0)[0])
    assert torch.equal(fuse(p, "fitted", 1e9, [0.0] * 3)[0], fuse(p, "mean")[0])
    for k in range(3):
        one_hot = [0.0 if j == k else -1e4 for j in range(3)]
        assert torch.equal(fuse(p, "fitted", 0.01, one_hot)[0][:, 0], p[:, k])


def test_fusion_rule_params_roundtrip_and_errors():
    from ctr_ensemble.layers.fusion import FusionRule

    rule = FusionRule("fitted", 0.123456789012345, [0.0, -1.2345678901234567, 3e-17], "logit")
    params = rule.params()
    assert params["fusion_mode"] == "fitted" and params["space"] == "logit"
    assert FusionRule.from_params(params, members=3) == rule  # floats survive exactly
    assert FusionRule.from_params({"fusion_mode": "negation_entropy", "tau": "0.5"}) == FusionRule("negation_entropy", 0.5)
    assert "priors" not in FusionRule("mean").params()
    for params, match in [({"fusion_mode": "fitted", "tau": "1"}, "JSON list"),
                          ({"fusion_mode": "fitted", "tau": "1", "priors": "[0, \"x\"]"}, "JSON list"),
                          ({"fusion_mode": "fitted", "tau": "0", "priors": "[0, 0, 0]"}, "tau must be > 0"),
                          ({"fusion_mode": "fitted", "tau": "1", "priors": "[0, 0]"}, "2 entries but the model has 3"),
                          ({"fusion_mode": "fitted", "tau": "1", "priors": "[0, 0, 0]", "space": "odds"}, "space"),
                          ({"fusion_mode": "fitted", "tau": "1", "priors": "[0, NaN, 0]"}, "finite"),
                          ({"fusion_mode": "vote"}, "unknown fusion mode"),
                          ({"fusion_mode": "mean", "tau": "x"}, "tau must be a number")]:
        with pytest.raises(ValueError, match=match):
            FusionRule.from_params(params, members=3)
    with pytest.raises(ValueError, match="belong to the 'fitted'"):
        fuse(torch.rand(4, 2), "negation_entropy", 1.0, space="logit")
    with pytest.raises(ValueError, match="needs priors"):
        fuse(torch.rand(4, 2), "fitted", 1.0)
