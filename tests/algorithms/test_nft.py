import math

import pytest
import torch

from diffrl.algorithms import (
    EMA_SCHEDULES,
    EMASchedule,
    adaptive_mse,
    advantages_to_optimality,
    ema_update,
    implicit_policies,
    nft_loss,
    nft_optimality,
    prediction_kl,
    sample_train_timesteps,
)
from diffrl.samplers import PredictionConfig, predict_x0_and_eps


def test_optimality_mapping_hand_computed():
    r = advantages_to_optimality(torch.tensor([-7.0, -5.0, -2.5, 0.0, 1.0, 5.0, 9.0]), adv_clip_max=5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0]))
    # rewards (1, 2, 3) in one group: advantages -+1 / (sqrt(2/3) + 1e-4) = -+1.2246 -> r = 0.5 -+ 0.12246
    r2 = nft_optimality(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3, dtype=torch.long))
    a = 1 / (math.sqrt(2 / 3) + 1e-4)
    torch.testing.assert_close(r2, torch.tensor([0.5 - a / 10, 0.5, 0.5 + a / 10]))


def test_nft_loss_hand_computed():
    # sample 0: x0 = (0, 0), x0_theta = (1, 3), x0_old = (1, 1), r = 0.75.
    #   beta = 1: x0_plus = (1, 3): mean sq 5, mean abs 2 -> L+ = 2.5; x0_minus = 2 old - theta = (1, -1): L- = 1
    #     loss = 0.75 * 2.5 + 0.25 * 1 = 2.125
    #   beta = 0.5: x0_plus = (1, 2): 2.5 / 1.5 = 5/3; x0_minus = 1.5 old - 0.5 theta = (1, 0): 0.5 / 0.5 = 1
    #     loss = (0.75 * 5/3 + 0.25 * 1) / 0.5 = 3.0
    # sample 1: theta = old = x0: both errors 0 (the 1e-5 floor keeps it finite) -> 0.
    x0 = torch.tensor([[0.0, 0.0], [2.0, -1.0]])
    theta = torch.tensor([[1.0, 3.0], [2.0, -1.0]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0], [2.0, -1.0]])
    r = torch.tensor([0.75, 0.3])
    loss1, stats1 = nft_loss(theta, old, x0, r, beta=1.0)
    assert loss1.item() == pytest.approx((2.125 + 0.0) / 2)
    assert stats1.positive_loss.item() == pytest.approx(2.5 / 2)
    assert stats1.negative_loss.item() == pytest.approx(1.0 / 2)
    assert stats1.old_deviation.item() == pytest.approx((0 + 4) / 4)
    loss_half, _ = nft_loss(theta, old, x0, r, beta=0.5)
    assert loss_half.item() == pytest.approx(3.0 / 2)
    # NVlabs' scale on the policy term, and a KL term
    kl = torch.tensor([0.2, 0.4])
    loss_kl, stats_kl = nft_loss(theta, old, x0, r, beta=1.0, kl=kl, kl_coef=0.1, policy_scale=5.0)
    assert loss_kl.item() == pytest.approx(5 * 2.125 / 2 + 0.1 * 0.3)
    assert stats_kl.kl_ref.item() == pytest.approx(0.3)
    # gradient with r = 1, beta = 1 on sample 0: d/dtheta [mean(err^2) / sg(mean|err|)] / B = 2 err / (D w B)
    #   = 2 * (1, 3) / (2 * 2 * 2) = (0.25, 0.75); the weight is detached (otherwise the gradient would differ).
    theta.grad = None
    loss_r1, _ = nft_loss(theta, old, x0, torch.tensor([1.0, 0.0]), beta=1.0)
    loss_r1.backward()
    torch.testing.assert_close(theta.grad[0], torch.tensor([0.25, 0.75]))
    with pytest.raises(ValueError, match="no kl was given"):
        nft_loss(theta, old, x0, r, beta=1.0, kl_coef=1e-4)
    with pytest.raises(ValueError, match="beta=0"):
        nft_loss(theta, old, x0, r, beta=0.0)


def test_zero_gradient_when_theta_equals_old_and_r_is_half():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 3, 8, 8, generator=gen)
    old = torch.randn(4, 3, 8, 8, generator=gen)
    theta = old.clone().requires_grad_(True)
    loss, _ = nft_loss(theta, old, x0, torch.full((4,), 0.5), beta=1.0)
    loss.backward()
    assert theta.grad.abs().max().item() < 1e-7
    # any other r moves theta: the check above could fail
    theta.grad = None
    loss2, _ = nft_loss(theta, old, x0, torch.tensor([0.9, 0.5, 0.1, 0.5]), beta=1.0)
    loss2.backward()
    assert theta.grad[0].abs().max().item() > 1e-4 and theta.grad[1].abs().max().item() < 1e-7


def _flow_toy(seed: int):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.99], dtype=torch.float64).reshape(5, 1, 1, 1)
    xt = (1 - t) * x0 + t * eps
    v_theta = torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64)
    v_old = torch.randn(5, 2, 4, 4, generator=gen, dtype=torch.float64)
    return x0, eps, t, xt, v_theta, v_old


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_x0_space_equals_the_papers_velocity_form_on_a_flow_toy(beta):
    x0, eps, t, xt, v_theta, v_old = _flow_toy(0)
    v = eps - x0
    r = torch.tensor([0.0, 0.2, 0.5, 0.7, 1.0], dtype=torch.float64)
    # paper: implicit policies in velocity space, mapped to x0 = x_t - t v
    v_plus, v_minus = beta * v_theta + (1 - beta) * v_old, (1 + beta) * v_old - beta * v_theta
    x0_plus, x0_minus = implicit_policies(xt - t * v_theta, xt - t * v_old, beta)
    torch.testing.assert_close(x0_plus, xt - t * v_plus)
    torch.testing.assert_close(x0_minus, xt - t * v_minus)
    # unweighted: ||x0_pm - x0||^2 = t^2 ||v_pm - v||^2
    per = lambda a, b: ((a - b) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
    torch.testing.assert_close(per(x0_plus, x0), t.flatten() ** 2 * per(v_plus, v))
    # adaptive weighting: L_x0 = t * L_v
    loss, _ = nft_loss(xt - t * v_theta, xt - t * v_old, x0, r, beta)
    velocity = t.flatten() * (r * adaptive_mse(v_plus, v) + (1 - r) * adaptive_mse(v_minus, v))
    torch.testing.assert_close(loss, velocity.mean() / beta)


def _ddpm_alphas() -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_output_space_implicit_policies_map_to_x0_space(prediction_type):
    gen = torch.Generator().manual_seed(2)
    shape = (3, 2, 4, 4)
    x0, eps = torch.randn(shape, generator=gen, dtype=torch.float64), torch.randn(shape, generator=gen, dtype=torch.float64)
    a = _ddpm_alphas()[torch.tensor([50, 400, 900])].reshape(3, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out_theta = torch.randn(shape, generator=gen, dtype=torch.float64)
    out_old = torch.randn(shape, generator=gen, dtype=torch.float64)
    config = PredictionConfig(prediction_type=prediction_type)
    to_x0 = lambda out: predict_x0_and_eps(out, xt, a, config)  # noqa: E731
    beta, r = 0.7, torch.tensor([0.1, 0.5, 0.95], dtype=torch.float64)
    out_plus, out_minus = implicit_policies(out_theta, out_old, beta)
    x0_plus, x0_minus = implicit_policies(to_x0(out_theta)[0], to_x0(out_old)[0], beta)
    torch.testing.assert_close(to_x0(out_plus)[0], x0_plus)
    torch.testing.assert_close(to_x0(out_minus)[0], x0_minus)
    # the epsilon estimate is affine in the output too: the same holds for eps_hat
    torch.testing.assert_close(
        to_x0(out_plus)[1], beta * to_x0(out_theta)[1] + (1 - beta) * to_x0(out_old)[1]
    )
    # the loss: L_x0 = |c_o| L_o, with o* the output that recovers x0 exactly
    target = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[prediction_type]
    torch.testing.assert_close(to_x0(target)[0], x0)
    c_o = {"epsilon": ((1 - a) / a).sqrt(), "v_prediction": (1 - a).sqrt(), "sample": torch.ones_like(a)}[
        prediction_type
    ].flatten()
    loss, _ = nft_loss(to_x0(out_theta)[0], to_x0(out_old)[0], x0, r, beta)
    output_space = c_o * (r * adaptive_mse(out_plus, target) + (1 - r) * adaptive_mse(out_minus, target))
    torch.testing.assert_close(loss, output_space.mean() / beta)


def test_clipped_x0_breaks_the_affine_map():
    # documented requirement: compute x0_hat for the NFT loss with clip_sample/thresholding off.
    gen = torch.Generator().manual_seed(3)
    xt = torch.randn(2, 1, 4, 4, generator=gen)
    a = torch.tensor([0.3, 0.6]).reshape(2, 1, 1, 1)
    out_theta, out_old = 3 * torch.randn(2, 1, 4, 4, generator=gen), 3 * torch.randn(2, 1, 4, 4, generator=gen)
    clipped = PredictionConfig(clip_sample=True)
    plus, _ = implicit_policies(out_theta, out_old, 0.5)
    x0_plus, _ = implicit_policies(
        predict_x0_and_eps(out_theta, xt, a, clipped)[0], predict_x0_and_eps(out_old, xt, a, clipped)[0], 0.5
    )
    assert not torch.allclose(predict_x0_and_eps(plus, xt, a, clipped)[0], x0_plus)


def test_prediction_kl():
    out = torch.tensor([[1.0, 3.0], [0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(prediction_kl(out, ref), torch.tensor([2.5, 0.0]))


def test_ema_schedules_follow_the_reference():
    linear, warm = EMA_SCHEDULES["linear"], EMA_SCHEDULES["warm_start"]
    assert [linear.decay(s) for s in (0, 100, 499, 500, 10_000)] == pytest.approx([0.0, 0.1, 0.499, 0.5, 0.5])
    assert [warm.decay(s) for s in (0, 74, 75, 76, 175, 208, 209, 1000)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.0075, 0.75, 0.9975, 0.999, 0.999]
    )
    assert EMA_SCHEDULES["none"].decay(123) == 0.0
    with pytest.raises(ValueError, match="max_decay=1"):
        EMASchedule(rate=0.1, max_decay=1.0)


def test_ema_update_in_place_follows_the_schedule():
    old = {"w": torch.zeros(3), "b": torch.tensor([4.0], dtype=torch.float64)}
    w_id = id(old["w"])
    new = {"w": torch.ones(3, requires_grad=True), "b": torch.tensor([0.0])}
    schedule = EMA_SCHEDULES["linear"]
    decays = [schedule.decay(step) for step in (100, 200, 300)]  # 0.1, 0.2, 0.3
    for d in decays:
        ema_update(old, new, d)
    # w_k = d w_{k-1} + (1 - d) * 1 with w_0 = 0 -> 1 - prod(d); b_k = d b_{k-1} -> 4 prod(d)
    prod = decays[0] * decays[1] * decays[2]
    torch.testing.assert_close(old["w"], torch.full((3,), 1 - prod))
    torch.testing.assert_close(old["b"], torch.tensor([4 * prod], dtype=torch.float64))
    assert id(old["w"]) == w_id and not old["w"].requires_grad and old["b"].dtype == torch.float64
    ema_update(old, new, 0.0)  # decay 0 copies the current weights
    torch.testing.assert_close(old["w"], torch.ones(3))
    with pytest.raises(ValueError, match="missing from new"):
        ema_update(old, {"w": torch.ones(3)}, 0.5)


def test_sample_train_timesteps():
    schedule = torch.tensor([981, 881, 781, 681, 581, 481, 381, 281, 181, 81])
    gen = torch.Generator().manual_seed(0)
    picked = sample_train_timesteps(schedule, 64, fraction=0.3, generator=gen)
    assert picked.shape == (64, 3)
    assert all(len(set(row.tolist())) == 3 and set(row.tolist()) <= set(schedule.tolist()) for row in picked)
    again = sample_train_timesteps(schedule, 64, fraction=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(picked, again)
    full = sample_train_timesteps(schedule, 4, generator=gen)
    assert all(sorted(row.tolist()) == sorted(schedule.tolist()) for row in full)
    counts = torch.bincount(torch.searchsorted(schedule.flip(0), picked.flatten()), minlength=10)
    assert counts.min().item() > 0  # every step is drawn somewhere in 192 draws
    with pytest.raises(ValueError, match="timestep_fraction=0.05"):
        sample_train_timesteps(schedule, 2, fraction=0.05)
