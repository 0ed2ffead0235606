"""Policies execute every reward-backpropagation plan: truncated suffixes, ReFL, DRaFT-LV."""

import pytest
import torch

from diffrl.algorithms.truncation import draft_k_plan, draft_lv_plan, refl_plan
from diffrl.pipelines import StableDiffusionPolicy

from .helpers import perturb_trainable

PROMPTS = ["a cat", "a dog"]


@pytest.fixture(scope="module")
def sd(tiny_sd_path):
    policy = StableDiffusionPolicy.from_pretrained(tiny_sd_path)
    perturb_trainable(policy)
    return policy


def _grad_flags(policy, fn):
    seen = []
    hook = policy.trainable_module.register_forward_hook(lambda m, i, o: seen.append(torch.is_grad_enabled()))
    try:
        out = fn()
    finally:
        hook.remove()
    return out, seen


def test_suffix_and_refl_plans_run_their_grad_steps(sd):
    images, seen = _grad_flags(sd, lambda: sd.sample_for_plan(PROMPTS, draft_k_plan(4, 2), num_inference_steps=4,
                                                               generator=torch.Generator().manual_seed(0)))
    assert seen == [False, False, True, True] and images.shape == (2, 3, 16, 16) and images.requires_grad
    plan = refl_plan(4, (1, 2), torch.Generator().manual_seed(0))
    images, seen = _grad_flags(sd, lambda: sd.sample_for_plan(PROMPTS, plan, num_inference_steps=4))
    assert seen == plan.grad_steps and images.shape == (2, 3, 16, 16)


def test_draft_lv_renoises_x0_to_the_last_step_and_denoises_it_with_gradients(sd):
    """Clark et al. 2023, Alg. 2, checked by hand: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, one DDIM step."""
    kwargs = dict(num_inference_steps=3, guidance_scale=4.0, eta=0.0)
    images, seen = _grad_flags(sd, lambda: sd.sample_for_plan(PROMPTS, draft_lv_plan(3, 2),
                                                               generator=torch.Generator().manual_seed(5), **kwargs))
    assert seen == [False, False, False, True]  # the chain without gradients, then one batched call with them
    assert images.shape == (4, 3, 16, 16) and images.requires_grad
    images.mean().backward()
    assert all(p.grad is not None for p in sd.trainable_parameters())
    sd.trainable_module.zero_grad(set_to_none=True)

    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        traj = sd.sample(PROMPTS, generator=g, **kwargs).trajectory
        eps = torch.randn(4, 4, 8, 8, generator=g)
        t, t_prev = traj.timesteps[0, -1], traj.prev_timesteps[0, -1]
        abar, abar_prev = (sd.schedule.scheduler.alphas_cumprod[i] for i in (t, t_prev))
        x_t = abar.sqrt() * traj.latents[:, -1].repeat(2, 1, 1, 1) + (1 - abar).sqrt() * eps
        cond = traj.conditioning.index(torch.tensor([0, 1, 0, 1]))
        e = sd.predict(x_t, t.expand(4), cond, 4.0)
        x0 = ((x_t - (1 - abar).sqrt() * e) / abar.sqrt()).clamp(-1, 1)  # the tiny SD 1.x config clips x0
        expected = sd.decode(abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * e)  # DDIM eq. 12, eta = 0
    torch.testing.assert_close(images.detach(), expected, rtol=1e-4, atol=1e-4)
