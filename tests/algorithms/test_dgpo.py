"""DGPO's group preference loss against hand-computed values, Diffusion-DPO for a group of two, and the gradient
DGPO's released code trains with."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffrl.algorithms.dgpo import dgpo_group_scores, dgpo_loss


def test_hand_computed_scores_and_loss():
    matching = torch.tensor([0.5, 0.7, 0.2, 0.4])
    ref = torch.tensor([0.6, 0.6, 0.3, 0.3])
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0])
    beta = 10.0
    # group 0: beta / 2 * (1 * (0.5 - 0.6) + (-1) * (0.7 - 0.6)) = 5 * (-0.2) = -1.0
    # group 1: 5 * (2 * (0.2 - 0.3) - 2 * (0.4 - 0.3)) = 5 * (-0.4) = -2.0
    scores = dgpo_group_scores(matching, ref, adv, 2, beta)
    torch.testing.assert_close(scores, torch.tensor([-1.0, -2.0]))
    loss, stats = dgpo_loss(matching, ref, adv, 2, beta)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-2.0))) / 2 / beta
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(stats.margin) == pytest.approx(1.5)
    assert float(stats.group_weight) == pytest.approx((torch.sigmoid(torch.tensor(-1.0)) +
                                                        torch.sigmoid(torch.tensor(-2.0))).item() / 2, rel=1e-6)


def test_a_group_of_two_is_diffusion_dpo():
    """Wallace et al. 2024 (eq. 14): L = -log sigma(-beta_d ((l_w - l_w,ref) - (l_l - l_l,ref))). A group of two whose
    advantages are +1 and -1 (a winner and a loser) gives exactly that with beta_d = beta / 2 (times 1 / beta)."""
    g = torch.Generator().manual_seed(0)
    l_w, l_l, r_w, r_l = torch.rand(4, generator=g).unbind()
    beta = 50.0
    loss, _ = dgpo_loss(torch.stack([l_w, l_l]), torch.stack([r_w, r_l]), torch.tensor([1.0, -1.0]), 2, beta)
    dpo = -F.logsigmoid(-(beta / 2) * ((l_w - r_w) - (l_l - r_l)))
    torch.testing.assert_close(loss * beta, dpo)


def test_the_gradient_is_the_released_surrogates():
    """DGPO's code trains ``mean_i(sigma(S_g) A_i l_i)`` with the weights detached; the objective's gradient is the
    same."""
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(8, generator=g, requires_grad=True)
    matching = theta ** 2  # any differentiable per-sample loss
    ref = torch.rand(8, generator=g)
    adv = torch.randn(8, generator=g)
    beta, group = 30.0, 4
    loss, _ = dgpo_loss(matching, ref, adv, group, beta)
    (grad,) = torch.autograd.grad(loss, theta)
    scores = dgpo_group_scores(matching.detach(), ref, adv, group, beta)
    weights = torch.sigmoid(scores).repeat_interleave(group)
    surrogate = (weights * adv * theta ** 2).mean()
    (expected,) = torch.autograd.grad(surrogate, theta)
    torch.testing.assert_close(grad, expected)


def test_zero_advantages_give_zero_gradient_and_the_reference_weight_one_half():
    theta = torch.randn(4, requires_grad=True)
    loss, stats = dgpo_loss(theta ** 2, (theta ** 2).detach(), torch.zeros(4), 2, 100.0)
    (grad,) = torch.autograd.grad(loss, theta)
    assert torch.equal(grad, torch.zeros(4))
    assert float(stats.group_weight) == 0.5  # at the reference every group's preference is a coin flip


def test_partial_groups_and_bad_beta_are_errors():
    x = torch.rand(6)
    with pytest.raises(ValueError, match="whole groups of 4"):
        dgpo_loss(x, x, x, 4, 10.0)
    with pytest.raises(ValueError, match="beta"):
        dgpo_loss(x, x, x, 2, 0.0)
