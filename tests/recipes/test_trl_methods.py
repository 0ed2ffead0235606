"""TRL 0.23.1's trainer methods that user code calls, against TRL's documented return structures (issue 17)."""

from __future__ import annotations

import random

import pytest
import torch

from diffrl import (AlignPropConfig, AlignPropTrainer, DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline)


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


def prompt():
    return random.choice(["a cat", "a dog"]), {"source": "test"}


@pytest.fixture
def ddpo(tiny_sd_path, tmp_path):
    config = DDPOConfig(num_epochs=1, sample_num_steps=3, sample_batch_size=2, sample_num_batches_per_epoch=1,
                        train_batch_size=1, mixed_precision="no", logdir=str(tmp_path / "logs"), seed=0)
    return DDPOTrainer(config, brightness, prompt, DefaultDDPOStableDiffusionPipeline(tiny_sd_path))


def test_loss_is_trls_clipped_surrogate(ddpo):
    advantages = torch.tensor([1.0, -2.0, 0.5])
    ratio = torch.tensor([1.5, 0.5, 1.0])
    eps = 0.2
    # TRL: mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))), by hand: max(-1.5, -1.2)=-1.2; max(1.0, 1.6)=1.6; -0.5
    expected = torch.tensor((-1.2 + 1.6 - 0.5) / 3)
    torch.testing.assert_close(ddpo.loss(advantages, eps, ratio), expected)


def test_generate_samples_returns_trls_dicts_and_calculate_loss_is_zero_on_policy(ddpo):
    samples, pairs = ddpo._generate_samples(iterations=2, batch_size=2)
    assert len(samples) == len(pairs) == 2
    sample = samples[0]
    assert {"prompt_ids", "prompt_embeds", "timesteps", "latents", "next_latents", "log_probs",
            "negative_prompt_embeds"} <= set(sample)
    b, n = 2, ddpo.config.sample_num_steps
    assert sample["timesteps"].shape == (b, n) and sample["log_probs"].shape == (b, n)
    assert sample["latents"].shape[:2] == (b, n) and sample["next_latents"].shape == sample["latents"].shape
    assert sample["prompt_ids"].shape[0] == b and sample["prompt_ids"].dtype == torch.long
    images, prompts, metadata = pairs[0]
    assert images.shape[0] == b and len(prompts) == b and metadata[0] == {"source": "test"}
    # TRL's calculate_loss on the [neg; pos] embeddings of a fresh trajectory: ratio 1, so no clipping, KL 0.
    embeds = torch.cat([sample["negative_prompt_embeds"], sample["prompt_embeds"]])
    with torch.no_grad():
        for j in range(n):
            loss, approx_kl, clipfrac = ddpo.calculate_loss(
                sample["latents"][:, j], sample["timesteps"][:, j], sample["next_latents"][:, j],
                sample["log_probs"][:, j], torch.tensor([1.0, -1.0]), embeds)
            assert float(approx_kl) < 1e-9 and float(clipfrac) == 0.0
            assert abs(float(loss)) < 1e-5  # -mean(A * 1) with advantages summing to 0


def test_compute_rewards_scores_each_batch(ddpo):
    _, pairs = ddpo._generate_samples(iterations=2, batch_size=2)
    results = ddpo.compute_rewards(pairs)
    assert len(results) == 2
    rewards, metadata = results[0]
    torch.testing.assert_close(rewards, pairs[0][0].mean(dim=(1, 2, 3)).cpu())
    assert ddpo.compute_rewards(pairs, is_async=True)[1][0].shape == (2,)


def test_create_model_card_has_the_hub_metadata(ddpo, tmp_path):
    ddpo.train()
    card = ddpo.create_model_card(str(tmp_path / "card"), model_name="my-ddpo", dataset_name="prompts",
                                  tags=["mine"])
    assert card.data.library_name == "diffusers" and "mine" in card.data.tags and card.data.datasets == ["prompts"]
    assert "# my-ddpo" in card.text and "reward/mean" in card.text
    assert (tmp_path / "card" / "README.md").read_text().startswith("---")


def test_alignprop_loss_and_rewards(tiny_sd_path, tmp_path):
    config = AlignPropConfig(num_epochs=1, sample_num_steps=3, train_batch_size=2, mixed_precision="no",
                             truncated_rand_backprop_minmax=(0, 3), logdir=str(tmp_path / "logs"))
    trainer = AlignPropTrainer(config, brightness, prompt, DefaultDDPOStableDiffusionPipeline(tiny_sd_path))
    pairs = trainer._generate_samples(2, generator=torch.Generator().manual_seed(0))
    assert {"images", "prompts", "prompt_metadata"} <= set(pairs)
    rewards = trainer.compute_rewards(pairs)
    assert rewards.shape == (2,) and rewards.requires_grad
    torch.testing.assert_close(trainer.loss(rewards), -rewards.mean())


def test_the_saved_result_carries_a_grid_of_samples_in_its_card(ddpo, tmp_path):
    from PIL import Image

    ddpo.train()
    ddpo.save_pretrained(str(tmp_path / "final"))
    grid = Image.open(tmp_path / "final" / "samples.png")
    assert grid.size[0] > grid.size[1] > 0  # 8 samples, 4 per row
    card = (tmp_path / "final" / "README.md").read_text()
    assert "![samples" in card and "(samples.png)" in card
