"""Stable Diffusion 2.x (velocity prediction), loaded from disk through the same code as real models."""

import pytest
import torch

from diffrl.pipelines import StableDiffusionPolicy
from diffrl.pipelines.auto import load_policy

from .helpers import perturb_trainable, recompute_log_probs

PROMPTS = ["a cat", "a dog riding a bike", ""]


def test_the_sd2_fixture_loads_as_a_v_prediction_policy(tiny_sd2_path):
    policy = load_policy(tiny_sd2_path)
    assert isinstance(policy, StableDiffusionPolicy)
    assert policy.schedule.prediction.prediction_type == "v_prediction"
    assert type(policy.pipeline.scheduler).__name__ == "DDIMScheduler"
    assert policy.trainable_module.config.use_linear_projection


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0], ids=["no-cfg", "cfg"])
def test_sd2_importance_ratio_is_one(tiny_sd2_path, use_lora, guidance_scale):
    policy = StableDiffusionPolicy.from_pretrained(tiny_sd2_path, use_lora=use_lora)
    perturb_trainable(policy)
    with torch.no_grad():
        traj = policy.sample(PROMPTS, num_inference_steps=5, guidance_scale=guidance_scale, eta=1.0,
                             generator=torch.Generator().manual_seed(0)).trajectory
        recomputed = recompute_log_probs(policy, traj, eta=1.0, guidance_scale=guidance_scale, chunk=3)
    assert traj.log_probs.shape == (3, 5)
    assert (torch.exp(recomputed - traj.log_probs) - 1).abs().max() < 1e-5


def test_sd2_same_seed_same_trajectory(tiny_sd2_path):
    policy = StableDiffusionPolicy.from_pretrained(tiny_sd2_path)
    runs = [policy.sample(PROMPTS, num_inference_steps=4, generator=torch.Generator().manual_seed(s)).trajectory
            for s in (5, 5, 6)]
    assert torch.equal(runs[0].latents, runs[1].latents) and torch.equal(runs[0].images, runs[1].images)
    assert torch.equal(runs[0].log_probs, runs[1].log_probs)
    assert not torch.equal(runs[0].latents, runs[2].latents)


def test_sd2_x0_is_the_velocity_formula(tiny_sd2_path):
    """``x0 = sqrt(abar) x_t - sqrt(1 - abar) v`` (Salimans & Ho 2022)."""
    policy = StableDiffusionPolicy.from_pretrained(tiny_sd2_path)
    cond = policy.encode_prompts(["a cat"], guidance=False)
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([400])
    with torch.no_grad():
        v = policy.predict(x, t, cond, 1.0)
        abar = policy.schedule.scheduler.alphas_cumprod[400]
        torch.testing.assert_close(policy.predict_x0(x, t, cond), abar.sqrt() * x - (1 - abar).sqrt() * v)
