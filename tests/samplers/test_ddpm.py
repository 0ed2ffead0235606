import pytest
import torch
from diffusers import DDPMScheduler

from diffrl.samplers import alphas_at, ddim_step, ddpm_step, previous_timesteps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_matches_diffusers_ddpm_step_with_shared_noise(prediction_type):
    from diffrl.samplers import PredictionConfig

    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False)
    sched.set_timesteps(20)
    cfg = PredictionConfig.from_scheduler_config(sched.config)
    x, out = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    for t in sched.timesteps[:-1]:  # diffusers adds no noise at t = 0
        ref = sched.step(out, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
        prev_t = previous_timesteps(t, 1000, 20)
        a, ap = alphas_at(sched.alphas_cumprod, t.repeat(2), prev_t.repeat(2), 4)
        ours = ddpm_step(out, x, a, ap, config=cfg, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(ours.prev_sample, ref, rtol=1e-4, atol=1e-5)


def test_fixed_small_equals_ddim_eta_one():
    sched = DDPMScheduler(num_train_timesteps=1000)
    x, out, z = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    t = torch.tensor(500)
    a, ap = alphas_at(sched.alphas_cumprod, t.repeat(2), previous_timesteps(t, 1000, 20).repeat(2), 4)
    d1 = ddpm_step(out, x, a, ap, noise=z)
    d2 = ddim_step(out, x, a, ap, eta=1.0, noise=z)
    torch.testing.assert_close(d1.mean, d2.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d1.std, d2.std, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(d1.log_prob, d2.log_prob, rtol=1e-5, atol=1e-4)


def test_log_prob_matches_normal():
    sched = DDPMScheduler(num_train_timesteps=1000)
    x, out = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([999, 500, 50, 1])
    a, ap = alphas_at(sched.alphas_cumprod, t, previous_timesteps(t, 1000, 20), 4)
    step = ddpm_step(out, x, a, ap, variance_type="fixed_large", generator=torch.Generator().manual_seed(0))
    ref = torch.distributions.Normal(step.mean, step.std.expand_as(step.mean)).log_prob(step.prev_sample)
    torch.testing.assert_close(step.log_prob, ref.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-4)
    assert float(step.std.min()) > 0  # the final step (t=1 -> 0) is stochastic too
