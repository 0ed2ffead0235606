"""The exact KL trust region (Flow-DPPO): the closed-form step KL against a Monte-Carlo estimate, its value on a
fresh trajectory, and the penalty and mask losses against hand-computed values."""

import pytest
import torch

from diffrl.algorithms import gaussian_mean_kl
from diffrl.algorithms.trust_region import trust_region_loss
from diffrl.samplers import gaussian_log_prob


def test_the_closed_form_step_kl_matches_a_monte_carlo_estimate():
    """KL(N(mu_old, s^2) || N(mu_theta, s^2)) per dimension, estimated as E_old[log p_old(x) - log p_theta(x)] over
    200,000 draws of the sampling step, equals ||mu_old - mu_theta||^2 / (2 s^2) (mean-reduced)."""
    g = torch.Generator().manual_seed(0)
    mu_old = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64)
    mu_theta = mu_old + 0.3 * torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64)
    std = torch.full((1, 1, 1, 1), 0.7, dtype=torch.float64)
    draws = mu_old + std * torch.randn(200_000, 2, 3, 3, generator=g, dtype=torch.float64)
    estimate = (gaussian_log_prob(draws, mu_old.expand_as(draws), std) -
                gaussian_log_prob(draws, mu_theta.expand_as(draws), std)).mean()
    exact = gaussian_mean_kl(mu_theta, mu_old, std)
    assert float(exact) == pytest.approx(float(estimate), rel=0.02)
    assert float(exact) == pytest.approx(float(((mu_old - mu_theta) ** 2).mean() / (2 * 0.49)), rel=1e-12)


def test_penalty_and_mask_against_hand_computed_values():
    log_prob = torch.tensor([0.1, -0.2, 0.05], requires_grad=True)
    old = torch.zeros(3)
    adv = torch.tensor([1.0, 1.0, -2.0])
    kl_old = torch.tensor([0.01, 0.002, 0.03], requires_grad=True)
    ratio = torch.exp(log_prob.detach())
    loss, st = trust_region_loss(log_prob, old, adv, kl_old, "kl_penalty", coef=2.0)
    assert float(loss.detach()) == pytest.approx(float((-adv * ratio).mean() + 2.0 * kl_old.detach().mean()), rel=1e-6)
    assert float(st.masked) == 0.0
    # the mask: sample 0 has KL 0.01 > 0.005 and its ratio moved the advantage's way (A > 0, ratio > 1): stopped;
    # sample 1 is inside the region; sample 2 is outside but moved against its advantage (A < 0, ratio > 1): kept
    loss, st = trust_region_loss(log_prob, old, adv, kl_old, "kl_mask", max_kl=0.005)
    (grad,) = torch.autograd.grad(loss, log_prob)
    assert grad[0] == 0 and grad[1] == pytest.approx(-float(ratio[1]) / 3) and grad[2] == pytest.approx(2 * float(ratio[2]) / 3)
    assert float(st.masked) == pytest.approx(1 / 3)
    assert float(loss.detach()) == pytest.approx(float((-adv * ratio).mean()), rel=1e-6)  # the value is never altered


def test_on_policy_the_ratio_is_one_and_the_gradient_the_policy_gradient():
    log_prob = torch.tensor([-1.3, 0.4], requires_grad=True)
    adv = torch.tensor([0.5, -1.5])
    for mode in ("kl_penalty", "kl_mask"):
        loss, st = trust_region_loss(log_prob, log_prob.detach(), adv, torch.zeros(2), mode)
        (grad,) = torch.autograd.grad(loss, log_prob)
        torch.testing.assert_close(grad, -adv / 2)
        assert float(st.ratio) == 1.0 and float(st.kl_old) == 0.0


def test_bad_inputs():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="'clip' is ppo_clip_loss"):
        trust_region_loss(x, x, x, x, "clip")
    with pytest.raises(ValueError, match="must all be"):
        trust_region_loss(x, x, x, torch.zeros(3), "kl_mask")
