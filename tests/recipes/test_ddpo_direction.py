"""DDPO's update moves the policy the right way on every policy kind: after one epoch of training, the
log-likelihood of the epoch's own trajectories rises where their advantage is positive and falls where it is
negative (Black et al. 2023: the policy gradient raises the probability of high-reward denoising chains)."""

from __future__ import annotations

import pytest
import torch

from diffrl import (DDPOConfig, DDPOTrainer, DefaultDDPODDPMPipeline, DefaultDDPOStableDiffusionPipeline,
                    DefaultDDPOStableDiffusionXLPipeline)
from diffrl.recipes.samples import EpochSamples, training_conditioning
from diffrl.testing.sdxl import save_tiny_sdxl


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


def _trajectory_log_likelihood(trainer, samples: EpochSamples, steps: int) -> torch.Tensor:
    """``[B]``: the summed per-step log-probabilities of each stored trajectory under the current weights."""
    cond, guidance = training_conditioning(samples, slice(0, samples.size), False, 1.0)
    with torch.no_grad():
        return torch.stack([trainer.policy.step_log_prob(samples.latents[:, j], samples.timesteps[:, j],
                                                         samples.prev_timesteps[:, j], samples.next_latents[:, j],
                                                         cond, eta=1.0, guidance_scale=guidance).log_prob
                            for j in range(steps)], dim=1).sum(dim=1)


@pytest.mark.parametrize("kind", ["ddpm", "sd", "sdxl"])
def test_one_epoch_raises_the_likelihood_of_high_advantage_trajectories(kind, tiny_ddpm_path, tiny_sd_path, tmp_path):
    if kind == "ddpm":
        pipe = DefaultDDPODDPMPipeline(tiny_ddpm_path)
    elif kind == "sd":
        pipe = DefaultDDPOStableDiffusionPipeline(tiny_sd_path)
    else:
        pipe = DefaultDDPOStableDiffusionXLPipeline(str(save_tiny_sdxl(tmp_path / "sdxl")))
    config = DDPOConfig(num_epochs=1, sample_num_steps=3, sample_batch_size=16, sample_num_batches_per_epoch=1,
                        train_batch_size=8, mixed_precision="no", logdir=str(tmp_path / "logs"), seed=0,
                        train_learning_rate=3e-3, train_clip_range=0.2, sample_guidance_scale=1.0)
    trainer = DDPOTrainer(config, brightness, lambda: ("a cat", {}), pipe)
    batches = trainer.recipe.sample_epoch(0, 0)[0]
    samples = EpochSamples.from_trajectories([b.samples for b in batches])
    rewards = torch.cat([b.rewards for b in batches])
    advantages = trainer.recipe.sample_weights(rewards.numpy(), ["a cat"] * samples.size)
    before = _trajectory_log_likelihood(trainer, samples, config.sample_num_steps)
    trainer.recipe.train_inner(samples, advantages, 0, 0, 0, {})
    change = _trajectory_log_likelihood(trainer, samples, config.sample_num_steps) - before
    assert change.abs().max() > 0
    correlation = torch.corrcoef(torch.stack([change, advantages.cpu()]))[0, 1]
    assert correlation > 0.5, f"{kind}: the update did not follow the advantages (correlation {correlation:.2f})"
