"""Advantage Weighted Matching's loss: pure functions checked against hand computations."""

import pytest
import torch

from diffrl.algorithms.awm import GHUBER_EPS, awm_loss, matching_loss, weighted_matching


def test_matching_loss_is_the_per_sample_mean_squared_error():
    out = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [3.0, 1.0]])
    assert matching_loss(out, target).tolist() == [2.5, 5.0]


def test_ghuber_weighting_by_hand():
    loss = torch.tensor([0.0, 1.0, 4.0])
    w = weighted_matching(loss, "ghuber", 0.5)
    expected = [((v + GHUBER_EPS) ** 0.5 - GHUBER_EPS ** 0.5) / 0.5 for v in (0.0, 1.0, 4.0)]
    torch.testing.assert_close(w, torch.tensor(expected))
    assert weighted_matching(loss, "uniform") is loss
    with pytest.raises(ValueError, match="power"):
        weighted_matching(loss, "ghuber", 0.0)


def test_plain_loss_lowers_the_error_of_good_samples_and_raises_that_of_bad_ones():
    w = torch.tensor([1.0, 1.0], requires_grad=True)
    loss, stats = awm_loss(w, w.detach(), torch.tensor([2.0, -1.0]), clip_range=0.0)
    loss.backward()
    assert w.grad.tolist() == [1.0, -0.5]  # d/dw mean(A w): descent lowers w_0 (A > 0), raises w_1 (A < 0)
    assert float(stats.ratio) == 1.0 and float(stats.clipfrac) == 0.0


def test_clipping_has_the_plain_gradient_at_ratio_one_and_stops_past_the_range():
    adv = torch.tensor([1.5, -0.5, 2.0])
    w = torch.tensor([0.3, 0.7, 1.1], requires_grad=True)
    clipped, _ = awm_loss(w, w.detach(), adv, clip_range=1e-3)
    clipped.backward()
    on_policy = w.grad.clone()
    w.grad = None
    plain, _ = awm_loss(w, w.detach(), adv, clip_range=0.0)
    plain.backward()
    torch.testing.assert_close(on_policy, w.grad)  # PPO's surrogate and AWM agree at the sampling policy
    # a sample already past the range in the direction its advantage pushes gets no gradient
    w_far = torch.tensor([0.3 - 0.01], requires_grad=True)  # ratio exp(0.01) > 1 + 1e-3 with A > 0
    loss, stats = awm_loss(w_far, torch.tensor([0.3]), torch.tensor([1.0]), clip_range=1e-3)
    loss.backward()
    assert w_far.grad.abs().item() == 0.0 and float(stats.clipfrac) == 1.0


def test_trust_region_and_reference_terms_are_added_with_their_weights():
    w = torch.tensor([0.5, 0.5])
    kl_old, kl_ref = torch.tensor([1.0, 3.0]), torch.tensor([4.0, 0.0])
    base, _ = awm_loss(w, w, torch.tensor([1.0, -1.0]), 0.0)
    total, stats = awm_loss(w, w, torch.tensor([1.0, -1.0]), 0.0, kl_old=kl_old, kl_old_coef=0.5, kl_ref=kl_ref,
                            kl_ref_coef=0.25)
    assert float(total - base) == pytest.approx(0.5 * 2.0 + 0.25 * 2.0)
    assert float(stats.kl_old) == 2.0 and float(stats.kl_ref) == 2.0
