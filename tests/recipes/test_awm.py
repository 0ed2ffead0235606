"""AWMTrainer on the tiny models: on-policy ratio 1, the model's own denoising target, training, resume, errors."""

import random

import pytest
import torch

from diffrl import AWMConfig, AWMTrainer, DefaultDDPODDPMPipeline, DefaultDDPOStableDiffusionPipeline
from diffrl.algorithms import awm as awm_math
from diffrl.config import ConfigError
from diffrl.recipes import awm as awm_recipe

from .helpers import assert_same_run, interrupt_and_resume, logged_metrics, trainable_weights


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


def _config(tmp_path, **kw):
    base = dict(num_epochs=2, sample_num_steps=3, sample_batch_size=4, sample_num_batches_per_epoch=1,
                train_batch_size=2, group_size=2, mixed_precision="no", logdir=str(tmp_path / "logs"), run_name="run",
                train_learning_rate=3e-3, seed=1)
    base.update(kw)
    return AWMConfig(**base)


def test_first_update_is_on_policy_and_trains_on_the_models_own_denoising_loss(tiny_ddpm_path, tmp_path,
                                                                              monkeypatch):
    calls = []
    real = awm_math.awm_loss

    def recording(w_theta, w_old, advantages, clip_range, **kw):
        calls.append((w_theta.detach().clone(), w_old.clone(), advantages.clone(), kw["matching"].clone()))
        return real(w_theta, w_old, advantages, clip_range, **kw)

    monkeypatch.setattr(awm_recipe, "awm_loss", recording)
    trainer = AWMTrainer(_config(tmp_path, awm_clip_range=1e-3, awm_kl_old_coef=0.1, train_lora=False), brightness,
                         lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path, use_lora=False))
    before = trainable_weights(trainer)
    trainer.train()
    w_theta, w_old, adv, matching = calls[0]
    torch.testing.assert_close(w_theta, w_old, rtol=0, atol=0)  # the weights that sampled: ratio exactly 1
    assert adv.abs().sum() > 0 and adv.abs().max() <= 5.0  # clipped group advantages of this minibatch
    assert (matching > 0).all()
    later = [c for c in calls[1:] if not torch.equal(c[0], c[1])]
    assert later  # after the first optimizer step the trained weights leave the sampling policy
    after = trainable_weights(trainer)
    assert any((after[n] - before[n]).abs().max() > 0 for n in before)
    row = logged_metrics(tmp_path)[-1]
    assert {"stats/ratio", "stats/clipfrac", "stats/kl_old", "stats/matching", "stats/adv_abs_mean"} <= set(row)


def test_matching_is_the_epsilon_denoising_loss_of_the_sample(tiny_ddpm_path, tmp_path):
    trainer = AWMTrainer(_config(tmp_path), brightness, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path))
    policy = trainer.policy
    x0 = policy.initial_noise(2, torch.Generator().manual_seed(0))
    noise = torch.randn_like(x0)
    t = torch.tensor([100, 600])
    from diffrl.recipes.nft import NFTSamples

    _, stats = trainer.recipe.compute_awm_loss(NFTSamples(x0, None, torch.tensor([1.0, -1.0])), t, noise)
    with torch.no_grad():
        x_t = policy.schedule.add_noise(x0, noise, t)  # epsilon-prediction: the target is the noise
        expected = ((policy.predict(x_t, t, None, 1.0) - noise) ** 2).mean(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(stats.matching, expected)


def test_resume_matches_an_uninterrupted_run(tiny_sd_path, tmp_path):
    def make(run_name, **kw):
        random.seed(0)
        torch.manual_seed(0)
        prompts = lambda: (random.choice(["a cat", "a dog"]), {})  # noqa: E731
        return AWMTrainer(_config(tmp_path, num_epochs=3, run_name=run_name, sample_num_steps=2, nft_kl_coef=0.1,
                                  awm_clip_range=1e-2, nft_ema_schedule="linear", **kw),
                          brightness, prompts, DefaultDDPOStableDiffusionPipeline(tiny_sd_path))

    straight = make("straight")
    straight.train()
    interrupted, resumed = interrupt_and_resume(make, tmp_path, stop_after=2)
    resumed.train()
    assert_same_run(straight, resumed, tmp_path)


@pytest.mark.parametrize("override,needle", [
    ({"awm_ghuber_power": 0.5}, "awm_ghuber_power=0.5: has no effect with awm_weighting='uniform'"),
    ({"awm_clip_range": 1.5}, "awm_clip_range=1.5: clips the ratio"),
    ({"awm_weighting": "ghuber", "awm_ghuber_power": 2.0}, "awm_ghuber_power=2.0: must be in (0, 1]"),
])
def test_bad_settings_are_named(tmp_path, override, needle):
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, **override).validate()
    assert needle in str(err.value)


def test_nft_only_fields_are_refused_by_name(tmp_path):
    from diffrl.config import load_config

    with pytest.raises(ConfigError, match="nft_beta=0.5: unknown field of AWMConfig"):
        load_config(None, ["trainer=awm", "nft_beta=0.5"])
