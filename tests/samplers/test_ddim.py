import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffrl.samplers import (
    DeterministicStepError,
    PredictionConfig,
    alphas_at,
    ddim_step,
    gaussian_log_prob,
    previous_timesteps,
)


def _scheduler(**kw) -> DDIMScheduler:
    base = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                set_alpha_to_one=False, steps_offset=1)
    base.update(kw)
    s = DDIMScheduler(**base)
    s.set_timesteps(10)
    return s


@pytest.mark.parametrize(
    "sched_kw",
    [
        {},
        {"prediction_type": "v_prediction"},
        {"prediction_type": "sample"},
        {"clip_sample": True, "clip_sample_range": 0.5},
        {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
    ],
    ids=["epsilon", "v", "sample", "clip", "threshold"],
)
@pytest.mark.parametrize("use_clipped", [False, True])
def test_zero_noise_mean_matches_diffusers_step(sched_kw, use_clipped):
    sched = _scheduler(**sched_kw)
    cfg = PredictionConfig.from_scheduler_config(sched.config)
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8) * 2
    out = torch.randn(3, 4, 8, 8)
    for t in sched.timesteps:  # every step, the last one (t=1 -> 0) included
        ref = sched.step(out, t, x, eta=1.0, use_clipped_model_output=use_clipped,
                         variance_noise=torch.zeros_like(x)).prev_sample
        prev_t = previous_timesteps(t, sched.config.num_train_timesteps, 10)
        a, ap = alphas_at(sched.alphas_cumprod, t.repeat(3), prev_t.repeat(3), x.ndim)
        ours = ddim_step(out, x, a, ap, eta=1.0, config=cfg, use_clipped_model_output=use_clipped,
                         noise=torch.zeros_like(x))
        torch.testing.assert_close(ours.prev_sample, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.mean, ref, rtol=1e-5, atol=1e-5)


def test_std_matches_diffusers_variance_and_noise_is_scaled():
    sched = _scheduler()
    x, out = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    z = torch.randn_like(x)
    for t in sched.timesteps:
        prev_t = previous_timesteps(t, 1000, 10)
        ref = sched.step(out, t, x, eta=0.7, variance_noise=z).prev_sample
        a, ap = alphas_at(sched.alphas_cumprod, t.repeat(2), prev_t.repeat(2), 4)
        ours = ddim_step(out, x, a, ap, eta=0.7, noise=z)
        torch.testing.assert_close(ours.prev_sample, ref, rtol=1e-5, atol=1e-5)
        assert float(ours.std.min()) > 0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_equals_torch_normal(reduction):
    sched = _scheduler()
    t = sched.timesteps[4]
    x, out = torch.randn(5, 4, 6, 6), torch.randn(5, 4, 6, 6)
    a, ap = alphas_at(sched.alphas_cumprod, t.repeat(5), previous_timesteps(t, 1000, 10).repeat(5), 4)
    step = ddim_step(out, x, a, ap, eta=1.0, generator=torch.Generator().manual_seed(1), reduction=reduction)
    dist = torch.distributions.Normal(step.mean, step.std.expand_as(step.mean))
    elementwise = dist.log_prob(step.prev_sample)
    expected = elementwise.mean(dim=(1, 2, 3)) if reduction == "mean" else elementwise.sum(dim=(1, 2, 3))
    torch.testing.assert_close(step.log_prob, expected, rtol=1e-5, atol=1e-4)


def test_evaluating_a_given_sample_reproduces_its_log_prob_and_has_grad():
    sched = _scheduler()
    t = sched.timesteps[2]
    x = torch.randn(2, 4, 4, 4)
    out = torch.randn(2, 4, 4, 4, requires_grad=True)
    a, ap = alphas_at(sched.alphas_cumprod, t.repeat(2), previous_timesteps(t, 1000, 10).repeat(2), 4)
    drawn = ddim_step(out.detach(), x, a, ap, eta=1.0, generator=torch.Generator().manual_seed(3))
    again = ddim_step(out, x, a, ap, eta=1.0, prev_sample=drawn.prev_sample)
    torch.testing.assert_close(again.log_prob, drawn.log_prob, rtol=0, atol=0)
    again.log_prob.sum().backward()
    assert out.grad is not None and out.grad.abs().sum() > 0


def test_per_sample_timesteps():
    sched = _scheduler()
    ts = sched.timesteps[[0, 5, 9]]
    x, out = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4)
    z = torch.randn_like(x)
    a, ap = alphas_at(sched.alphas_cumprod, ts, previous_timesteps(ts, 1000, 10), 4)
    batched = ddim_step(out, x, a, ap, eta=1.0, noise=z)
    for i, t in enumerate(ts):
        ref = sched.step(out[i : i + 1], t, x[i : i + 1], eta=1.0, variance_noise=z[i : i + 1]).prev_sample
        torch.testing.assert_close(batched.prev_sample[i : i + 1], ref, rtol=1e-5, atol=1e-5)


def test_generator_drives_the_noise():
    sched = _scheduler()
    t = sched.timesteps[0]
    x, out = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    a, ap = alphas_at(sched.alphas_cumprod, t.repeat(2), previous_timesteps(t, 1000, 10).repeat(2), 4)
    torch.manual_seed(123)
    s1 = ddim_step(out, x, a, ap, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
    torch.manual_seed(999)  # the global RNG must not matter
    s2 = ddim_step(out, x, a, ap, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
    s3 = ddim_step(out, x, a, ap, eta=1.0, generator=torch.Generator().manual_seed(8)).prev_sample
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, s3)


def test_eta_zero_is_deterministic_but_has_no_log_prob():
    sched = _scheduler()
    t = sched.timesteps[0]
    x, out = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    a, ap = alphas_at(sched.alphas_cumprod, t.repeat(2), previous_timesteps(t, 1000, 10).repeat(2), 4)
    step = ddim_step(out, x, a, ap, eta=0.0, compute_log_prob=False)
    ref = sched.step(out, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(step.prev_sample, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(DeterministicStepError, match="eta = 0"):
        ddim_step(out, x, a, ap, eta=0.0)


def test_zero_std_log_prob_is_a_clear_error():
    with pytest.raises(DeterministicStepError, match="standard deviation 0"):
        gaussian_log_prob(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 1))


def test_hand_computed_log_prob():
    # N(x=1; mean=0, std=2): -1/8 - log 2 - log sqrt(2 pi)
    lp = gaussian_log_prob(torch.ones(1, 1), torch.zeros(1, 1), torch.full((1, 1), 2.0))
    assert lp.item() == pytest.approx(-1 / 8 - math.log(2) - 0.5 * math.log(2 * math.pi), abs=1e-6)


def test_bad_arguments():
    x = torch.randn(1, 1, 2, 2)
    a = torch.tensor(0.5)
    with pytest.raises(ValueError, match="eta=-1"):
        ddim_step(x, x, a, a, eta=-1)
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        PredictionConfig(prediction_type="flow")
