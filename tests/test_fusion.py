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
