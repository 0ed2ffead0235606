"""DGPOTrainer on the tiny models: whole groups per minibatch at one timestep and noise, the reference, training,
resume, a flow model, errors."""

import random

import pytest
import torch

from diffrl import DefaultDDPODDPMPipeline, DefaultDDPOStableDiffusionPipeline, DGPOConfig, DGPOTrainer
from diffrl.algorithms import dgpo as dgpo_math
from diffrl.config import ConfigError
from diffrl.recipes import dgpo as dgpo_recipe

from .helpers import assert_same_run, interrupt_and_resume, logged_metrics, trainable_weights


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


def _config(tmp_path, **kw):
    base = dict(num_epochs=2, sample_num_steps=3, sample_batch_size=4, sample_num_batches_per_epoch=2,
                train_batch_size=4, group_size=2, mixed_precision="no", logdir=str(tmp_path / "logs"),
                run_name="run", train_learning_rate=3e-3, seed=1, dgpo_beta=10.0)
    base.update(kw)
    return DGPOConfig(**base)


def test_minibatches_hold_whole_groups_at_one_timestep_and_noise(tiny_sd_path, tmp_path, monkeypatch):
    seen = []
    real = dgpo_recipe.DGPORecipe.compute_dgpo_loss

    def recording(self, batch, t, noise):
        seen.append((batch.r.clone(), t.clone(), noise.clone()))
        return real(self, batch, t, noise)

    monkeypatch.setattr(dgpo_recipe.DGPORecipe, "compute_dgpo_loss", recording)
    calls = []
    loss = dgpo_math.dgpo_loss

    def recorded_loss(matching, matching_ref, *args, **kwargs):
        calls.append((matching.detach().clone(), matching_ref.clone()))
        return loss(matching, matching_ref, *args, **kwargs)

    monkeypatch.setattr(dgpo_recipe, "dgpo_loss", recorded_loss)
    prompts = iter(["a cat", "a dog", "a fox", "a cow"] * 4)
    trainer = DGPOTrainer(_config(tmp_path), brightness, lambda: (next(prompts), {}),
                          DefaultDDPOStableDiffusionPipeline(tiny_sd_path))
    before = trainable_weights(trainer)
    trainer.train()
    assert seen and len(seen) == len(calls)
    for r, t, noise in seen:
        assert r.shape == (4,)
        for g in range(2):  # two groups of two per minibatch: one timestep and one noise each
            assert t[2 * g] == t[2 * g + 1] and torch.equal(noise[2 * g], noise[2 * g + 1])
            assert torch.isclose(r[2 * g], -r[2 * g + 1], atol=1e-5)  # a group of two: advantages +a and -a
        assert not torch.equal(noise[0], noise[2])
    # LoRA starts as the frozen reference: the first call's losses equal the reference's exactly
    torch.testing.assert_close(calls[0][0], calls[0][1], rtol=0, atol=0)
    after = trainable_weights(trainer)
    assert any((after[n] - before[n]).abs().max() > 0 for n in before)
    row = logged_metrics(tmp_path)[0]
    assert row["stats/group_weight"] == pytest.approx(0.5, abs=0.05)
    assert {"stats/margin", "stats/matching", "stats/adv_abs_mean", "loss/policy"} <= set(row)


def test_resume_matches_an_uninterrupted_run(tiny_ddpm_path, tmp_path):
    def make(run_name, **kw):
        return DGPOTrainer(_config(tmp_path, num_epochs=3, run_name=run_name, nft_kl_coef=0.1,
                                   dgpo_reference="old", nft_ema_schedule="linear", train_lora=False, **kw),
                           brightness, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path, use_lora=False))

    straight = make("straight")
    straight.train()
    _, resumed = interrupt_and_resume(make, tmp_path, stop_after=2)
    resumed.train()
    assert_same_run(straight, resumed, tmp_path)


def test_full_fine_tuning_keeps_a_frozen_reference(tiny_ddpm_path, tmp_path):
    trainer = DGPOTrainer(_config(tmp_path, train_lora=False), brightness, lambda: ("", {}),
                          DefaultDDPODDPMPipeline(tiny_ddpm_path, use_lora=False))
    initial = trainable_weights(trainer)
    trainer.train()
    reference = trainer.policy.reference_params()
    for name, value in initial.items():
        torch.testing.assert_close(reference[name], value, rtol=0, atol=0)
    assert any((trainable_weights(trainer)[n] - initial[n]).abs().max() > 0 for n in initial)


def test_dgpo_on_a_flow_model(tiny_sd3_path, tmp_path):
    """On SD3 the matching target is the velocity ``eps - x0``; a short run changes the weights and stays finite."""
    from diffrl.pipelines import StableDiffusion3Policy

    policy = StableDiffusion3Policy.from_pretrained(tiny_sd3_path)
    before = {n: p.detach().clone() for n, p in policy.trainable_module.named_parameters() if p.requires_grad}
    random.seed(0)
    DGPOTrainer(_config(tmp_path, sample_guidance_scale=1.0), brightness,
                lambda: (random.choice(["a cat", "a dog"]), {}), policy).train()
    after = {n: p.detach() for n, p in policy.trainable_module.named_parameters() if p.requires_grad}
    assert any((after[n] - before[n]).abs().max() > 0 for n in before)
    assert all(torch.isfinite(v).all() for v in after.values())


@pytest.mark.parametrize("override,needle", [
    ({"group_size": 1}, "group_size=1: must be at least 2"),
    ({"train_batch_size": 3, "sample_batch_size": 6}, "train_batch_size=3: is not a multiple of group_size=2"),
    ({"dgpo_beta": 0.0}, "dgpo_beta=0.0"),
    ({"dgpo_reference": "ema"}, "dgpo_reference='ema'"),
])
def test_bad_settings_are_named(tmp_path, override, needle):
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, **override).validate()
    assert needle in str(err.value)
