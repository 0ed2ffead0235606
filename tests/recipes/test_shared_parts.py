"""What every trainer shares is shared for real: one definition per metric, one rule for negative prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrl import (AlignPropConfig, AlignPropTrainer, DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline,
                    GRPOConfig, GRPOTrainer, NFTConfig, NFTTrainer)
from tests.recipes.helpers import logged_metrics

TRAINERS = {
    "ddpo": (DDPOTrainer, DDPOConfig, dict(sample_batch_size=4, sample_num_batches_per_epoch=2, train_batch_size=4)),
    "alignprop": (AlignPropTrainer, AlignPropConfig, dict(train_batch_size=2, train_gradient_accumulation_steps=2,
                                                       truncated_rand_backprop_minmax=(0, 2))),
    "grpo": (GRPOTrainer, GRPOConfig, dict(prompts_per_epoch=2, group_size=4, sample_batch_size=4, train_batch_size=4)),
    "nft": (NFTTrainer, NFTConfig, dict(group_size=2, sample_batch_size=4, sample_num_batches_per_epoch=2,
                                        train_batch_size=4)),
}


class RecordingReward:
    """Brightness (differentiable, for AlignProp) that records every value it returned and the negative-free
    prompts it scored."""

    def __init__(self):
        self.values: list[float] = []

    def __call__(self, images, prompts, metadata):
        rewards = images.float().mean(dim=(1, 2, 3))
        self.values += rewards.detach().tolist()
        return rewards, {}


def _prompts():
    names = iter(["a cat", "a dog", "a fox", "a cow"] * 100)
    return lambda: (next(names), {})


def _trainer(name, sd_path, tmp_path, reward, **overrides):
    trainer_class, config_class, sizes = TRAINERS[name]
    torch.manual_seed(0)
    config = config_class(num_epochs=1, sample_num_steps=2, mixed_precision="no", logdir=str(tmp_path / "logs"),
                          run_name="run", save_freq=10, **{**sizes, **overrides})
    return trainer_class(config, reward, _prompts(), DefaultDDPOStableDiffusionPipeline(sd_path))


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_every_trainer_reports_reward_std_and_throughput_by_one_definition(tiny_sd_path, tmp_path, name):
    """``reward/std`` is the population standard deviation of every reward the epoch scored, and
    ``perf/samples_per_s`` the samples per second of sampling and scoring, whatever the trainer (they once
    disagreed: Bessel-corrected in GRPO, over the whole epoch in AlignProp)."""
    reward = RecordingReward()
    _trainer(name, tiny_sd_path, tmp_path, reward).train()
    row = logged_metrics(tmp_path)[-1]
    values = np.array(reward.values)
    assert len(values) >= 4
    assert row["reward/std"] == pytest.approx(values.std(), rel=1e-5, abs=1e-7)
    assert row["reward/mean"] == pytest.approx(values.mean(), rel=1e-5)
    assert row["perf/samples_per_s"] == pytest.approx(len(values) / (row["perf/sampling_s"] + row["perf/reward_s"]),
                                                      rel=1e-6)
    assert row["perf/epoch_s"] == pytest.approx(row["perf/sampling_s"] + row["perf/reward_s"] + row["perf/training_s"])


@pytest.mark.parametrize("name", sorted(TRAINERS))
@pytest.mark.parametrize("negatives", ["blurry, ugly", "blurry"])
def test_every_trainer_cycles_negative_prompts_within_each_batch(tiny_sd_path, tmp_path, monkeypatch, name, negatives):
    """TRL's rule for every trainer: the configured negative prompts in turn within each batch. NFT once passed the
    whole list and crashed on two negatives."""
    from diffrl.pipelines import stable_diffusion

    seen: list[list[str]] = []
    real = stable_diffusion.per_prompt_negatives

    def recording(prompts, negative_prompts):
        out = real(prompts, negative_prompts)
        if out is not None:
            seen.append(list(out))
        return out

    monkeypatch.setattr(stable_diffusion, "per_prompt_negatives", recording)
    trainer = _trainer(name, tiny_sd_path, tmp_path, RecordingReward(), negative_prompts=negatives,
                       sample_guidance_scale=2.0)
    trainer.train()
    expected = [n.strip() for n in negatives.split(",")]
    assert seen, "the negative prompts never reached the text encoder"
    for batch in seen:
        assert batch == [expected[i % len(expected)] for i in range(len(batch))]
