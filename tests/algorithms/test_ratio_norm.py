"""GRPO-Guard's RatioNorm (arXiv 2510.22319, Eq. 8) and step reweighting: the normalised log-ratio against its
closed form, the shift and spread it removes (Monte Carlo), the loss against hand values, ratio 1 on policy, and
the schedules' output gains (the reweighting's 1 / dt)."""

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffrl.algorithms import gaussian_mean_kl
from diffrl.algorithms.ratio_norm import normalised_log_ratio, ratio_norm_loss, step_std
from diffrl.samplers import gaussian_log_prob
from diffrl.samplers.denoising import DenoisingSchedule
from diffrl.samplers.flow_schedule import FlowMatchSchedule


def _step(std: float, d_scale: float, draws: int, seed: int = 0):
    """Sampling means, a trained mean moved by ``d``, and ``draws`` recorded transitions ``mu_old + std z``."""
    g = torch.Generator().manual_seed(seed)
    mu_old = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)
    d = d_scale * torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)
    z = torch.randn(draws, 2, 4, 4, generator=g, dtype=torch.float64)
    s = torch.full((draws, 1, 1, 1), std, dtype=torch.float64)
    return mu_old.expand_as(z), (mu_old + d).expand_as(z), z, s


def _log_ratio_parts(mu_old, mu_theta, z, s):
    x = mu_old + s * z
    log_prob, old = gaussian_log_prob(x, mu_theta, s), gaussian_log_prob(x, mu_old, s)
    return log_prob, old, gaussian_mean_kl(mu_theta, mu_old, s)


def test_the_normalised_log_ratio_is_the_noise_times_the_mean_shift():
    """(log r + KL_old) * s == mean(z * (mu_theta - mu_old)) for every draw (the derivation in the module)."""
    mu_old, mu_theta, z, s = _step(0.3, 0.05, draws=5)
    log_prob, old, kl = _log_ratio_parts(mu_old, mu_theta, z, s)
    norm = normalised_log_ratio(log_prob, old, kl, step_std(s, 5))
    expected = (z * (mu_theta - mu_old)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(norm, expected, rtol=1e-9, atol=1e-12)


def test_it_removes_the_left_shift_and_the_std_dependence():
    """Over 100k draws the raw log-ratio averages -KL (< 0) and its spread scales as 1 / s; the normalised one
    averages 0 with the same spread at s = 0.1 and s = 1."""
    spreads = []
    for std in (0.1, 1.0):
        mu_old, mu_theta, z, s = _step(std, 0.02, draws=100_000, seed=1)
        log_prob, old, kl = _log_ratio_parts(mu_old, mu_theta, z, s)
        raw = log_prob - old
        assert float(raw.mean()) == pytest.approx(-float(kl[0]), rel=0.05)
        norm = normalised_log_ratio(log_prob, old, kl, step_std(s, len(z)))
        assert abs(float(norm.mean())) < 4 * float(norm.std()) / math.sqrt(len(z))
        spreads.append((float(raw.std()), float(norm.std())))
    assert spreads[0][0] == pytest.approx(10 * spreads[1][0], rel=0.02)
    assert spreads[0][1] == pytest.approx(spreads[1][1], rel=0.02)


def test_its_gradient_in_the_trained_mean_does_not_depend_on_the_shift_or_the_std():
    for std, d_scale in ((0.05, 0.0), (0.05, 0.3), (2.0, 0.3)):
        mu_old, mu_theta, z, s = _step(std, d_scale, draws=3, seed=2)
        mu_theta = mu_theta.clone().requires_grad_(True)
        log_prob, old, kl = _log_ratio_parts(mu_old, mu_theta, z, s)
        norm = normalised_log_ratio(log_prob, old, kl, step_std(s, 3))
        (grad,) = torch.autograd.grad(norm.sum(), mu_theta)
        torch.testing.assert_close(grad, z / z[0].numel(), rtol=1e-9, atol=1e-12)


def test_the_loss_against_hand_computed_values():
    log_prob = torch.tensor([0.02, -0.01, 0.005], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(3, dtype=torch.float64)
    kl_old = torch.tensor([0.001, 0.004, 0.0], dtype=torch.float64)
    std = torch.tensor([0.5, 0.2, 1.0], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    weight = torch.tensor([2.0, 3.0, 0.5], dtype=torch.float64)
    eps = 0.005
    loss, st = ratio_norm_loss(log_prob, old, adv, kl_old, std, eps, weight)
    r = [math.exp(0.021 * 0.5), math.exp(-0.006 * 0.2), math.exp(0.005)]
    # row 0: A > 0, r = 1.0105 above 1 + eps: clipped term; row 1: A < 0, r = 0.9988 inside; row 2: r = 1.00501 clipped
    terms = [max(-1 * r[0], -1 * (1 + eps)), max(1 * r[1], 1 * min(max(r[1], 1 - eps), 1 + eps)),
             max(-2 * r[2], -2 * (1 + eps))]
    expected = (2.0 * terms[0] + 3.0 * terms[1] + 0.5 * terms[2]) / 3
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
    assert float(st.clipfrac) == pytest.approx(2 / 3) and float(st.ratio) == pytest.approx(sum(r) / 3, rel=1e-12)
    assert float(st.kl_old) == pytest.approx(0.005 / 3)
    (grad,) = torch.autograd.grad(loss, log_prob)
    assert grad[0] == 0 and grad[2] == 0  # clipped rows pass no gradient
    assert float(grad[1]) == pytest.approx(3.0 * r[1] * 0.2 / 3, rel=1e-12)


def test_on_policy_the_ratio_is_exactly_one():
    log_prob = torch.tensor([-1.3, 0.4, 2.0], requires_grad=True)
    std = torch.tensor([0.3, 0.3, 0.3])
    adv = torch.tensor([0.5, -1.5, 1.0])
    loss, st = ratio_norm_loss(log_prob, log_prob.detach(), adv, torch.zeros(3), std, 1e-4)
    assert float(st.ratio) == 1.0 and float(st.raw_ratio) == 1.0 and float(st.clipfrac) == 0.0
    (grad,) = torch.autograd.grad(loss, log_prob)
    torch.testing.assert_close(grad, -adv * 0.3 / 3)


def test_a_deterministic_row_has_ratio_one_and_no_gradient():
    """CPS's last step has std 0 (log-probability 0 by convention): its KL is 0, not an error, and its normalised
    log-ratio 0."""
    from diffrl.algorithms.trust_region import kl_to_sampling

    mean = torch.randn(2, 3, 2, 2, requires_grad=True)
    std = torch.tensor([0.4, 0.0]).reshape(2, 1, 1, 1)
    kl = kl_to_sampling(mean, mean.detach() + 0.1, std)
    assert float(kl[1].detach()) == 0.0 and float(kl[0].detach()) == pytest.approx(0.01 / (2 * 0.16), rel=1e-5)
    norm = normalised_log_ratio(torch.zeros(2, requires_grad=True), torch.zeros(2), kl, step_std(std, 2))
    (grad,) = torch.autograd.grad(norm.sum(), mean)
    assert float(norm[1].detach()) == 0.0 and bool((grad[1] == 0).all()) and bool((grad[0] != 0).any())


def test_bad_inputs():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="must all be"):
        normalised_log_ratio(x, x, x, torch.ones(3))
    with pytest.raises(ValueError, match=">= 0"):
        normalised_log_ratio(x, x, x, torch.tensor([0.1, -1.0]))
    with pytest.raises(ValueError, match="weight has shape"):
        ratio_norm_loss(x, x, x, x, torch.ones(2), 0.1, torch.ones(3))


def test_output_gains_are_dt_on_flows_and_the_ddim_coefficient_on_unets():
    flow = FlowMatchSchedule.from_scheduler_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    grid = flow.sigmas(10) * 1000
    t, t_next = grid[:-1], grid[1:]
    torch.testing.assert_close(flow.output_gain(t, t_next), (t - t_next) / 1000)
    for prediction in ("epsilon", "v_prediction", "sample"):
        ddim = DenoisingSchedule.from_scheduler_config(DDPMScheduler(prediction_type=prediction, clip_sample=False).config)
        t = ddim.timesteps(20)
        prev = ddim.prev_timesteps(t, 20)
        gain = ddim.output_gain(t, prev)
        # the step is affine in the output (no clipping): the gain is the change per unit output at any x_t
        x = torch.randn(len(t), 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        moved = ddim.deterministic_step(out + 1, x, t, prev).prev_sample
        still = ddim.deterministic_step(out, x, t, prev).prev_sample
        torch.testing.assert_close(gain.double(), (moved - still).abs()[:, 0, 0, 0], rtol=1e-5, atol=1e-7)
        if prediction == "epsilon":
            a = ddim.scheduler.alphas_cumprod.double()
            closed = ((1 - a[prev]).sqrt() - (a[prev] * (1 - a[t]) / a[t]).sqrt()).abs()
            torch.testing.assert_close(gain.double(), closed, rtol=1e-5, atol=1e-7)
