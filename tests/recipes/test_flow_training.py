"""Every trainer on the tiny Stable Diffusion 3 (a flow-matching transformer): the reward rises on fixed seeds,
the first update is on-policy, a resumed run continues exactly, ``diffrl train`` saves a LoRA plain diffusers loads
and reproduces, and a checkpoint of a UNet run is refused by a flow model before any weights load."""

import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from diffrl import (AlignPropConfig, AlignPropTrainer, AWMConfig, AWMTrainer, DDPOConfig, DDPOTrainer, GRPOConfig,
                    GRPOTrainer, NFTConfig, NFTTrainer)
from diffrl.algorithms.nft import adaptive_mse, implicit_policies
from diffrl.pipelines import StableDiffusion3Policy
from diffrl.recipes import grpo as grpo_module

from .helpers import assert_same_run, interrupt_and_resume


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


def _fixed_seed_brightness(policy, n=32):
    """Mean brightness of ``n`` ODE samples from fixed noise (the std over images is about 0.004: the tiny random
    VAE maps latents to nearly equal brightness, so the standard error of this mean is about 0.0007)."""
    with torch.no_grad():
        return float(policy.sample(["a cat"] * n, num_inference_steps=6, guidance_scale=1.0, eta=0.0,
                                   generator=torch.Generator().manual_seed(1234)).trajectory.images.mean())


def _common(tmp_path, run="run", **kw):
    return dict(num_epochs=10, sample_num_steps=6, mixed_precision="no", logdir=str(tmp_path / "logs"), run_name=run,
                seed=1, train_learning_rate=3e-2, sample_guidance_scale=1.0, save_freq=1000) | kw


def test_grpo_raises_the_reward_on_fixed_seeds(tiny_sd3_path, tmp_path, monkeypatch):
    """Full fine-tuning, Flow-GRPO's SDE (noise level 0.7). Seeds 1-4 of this config measured +0.010, +0.005,
    +0.026, +0.030 (0.532 before); the bound sits below all of them."""
    ratios = []
    loss = grpo_module.grpo_loss

    def recorded(log_prob, old_log_prob, *args, **kwargs):
        ratios.append((log_prob - old_log_prob).detach().exp())
        return loss(log_prob, old_log_prob, *args, **kwargs)

    monkeypatch.setattr(grpo_module, "grpo_loss", recorded)
    policy = StableDiffusion3Policy.from_pretrained(tiny_sd3_path, use_lora=False)
    before = _fixed_seed_brightness(policy)
    config = GRPOConfig(**_common(tmp_path, num_epochs=15), prompts_per_epoch=4, group_size=4, sample_batch_size=8,
                        train_batch_size=8, sample_eta=0.7, train_clip_range=0.2)
    GRPOTrainer(config, brightness, lambda: ("a cat", {}), policy).train()
    assert (ratios[0] - 1).abs().max() < 1e-5  # the first minibatch is on-policy: ratio 1 at its steps
    after = _fixed_seed_brightness(policy)
    assert after > before + 0.004, (before, after)


def test_nft_raises_the_reward_on_fixed_seeds(tiny_sd3_path, tmp_path):
    """DiffusionNFT with the Euler ODE sampler (nft_sampler ddim, eta 0). Seeds 1-4 measured +0.042, +0.013,
    +0.038, +0.010."""
    policy = StableDiffusion3Policy.from_pretrained(tiny_sd3_path, use_lora=False)
    before = _fixed_seed_brightness(policy)
    config = NFTConfig(**_common(tmp_path), group_size=4, sample_batch_size=8, sample_num_batches_per_epoch=1,
                       train_batch_size=8, sample_eta=0.0)
    NFTTrainer(config, brightness, lambda: ("a cat", {}), policy).train()
    after = _fixed_seed_brightness(policy)
    assert after > before + 0.008, (before, after)


def test_alignprop_with_gradient_checkpointing_raises_the_reward(tiny_sd3_path, tmp_path):
    """Reward backpropagation through the ODE (DRaFT-2), LoRA, every model call checkpointed. Seeds 1-4 measured
    +0.012 each."""
    policy = StableDiffusion3Policy.from_pretrained(tiny_sd3_path, use_lora=True)
    before = _fixed_seed_brightness(policy)
    config = AlignPropConfig(**_common(tmp_path, num_epochs=6, train_learning_rate=0.1), train_batch_size=4,
                             truncation="draft_k", draft_k=2, gradient_checkpointing=True)
    AlignPropTrainer(config, brightness, lambda: ("a cat", {}), policy).train()
    after = _fixed_seed_brightness(policy)
    assert after > before + 0.008, (before, after)


@pytest.mark.parametrize("trainer", ["ddpo", "ddpo_guard", "awm"])
def test_ddpo_and_awm_train_on_the_flow_model(tiny_sd3_path, tmp_path, trainer):
    """DDPO-IS on the SDE chain (CPS, whose last step is deterministic: log-probability 0, ratio 1), with
    GRPO-Guard's RatioNorm and 1 / dt reweighting (the deterministic step: KL 0, ratio 1), and AWM's flow-matching
    loss (target ``v = eps - x0``) run and change the weights."""
    policy = StableDiffusion3Policy.from_pretrained(tiny_sd3_path, use_lora=True, sde_type="cps")
    before = {n: p.detach().clone() for n, p in policy.trainable_module.named_parameters() if p.requires_grad}
    if trainer.startswith("ddpo"):
        config = DDPOConfig(**_common(tmp_path, num_epochs=2), sample_batch_size=4, sample_num_batches_per_epoch=1,
                            train_batch_size=4, sample_eta=0.7, ratio_norm=trainer == "ddpo_guard")
        DDPOTrainer(config, brightness, lambda: ("a cat", {}), policy).train()
    else:
        config = AWMConfig(**_common(tmp_path, num_epochs=2), group_size=4, sample_batch_size=8,
                           sample_num_batches_per_epoch=1, train_batch_size=8)
        AWMTrainer(config, brightness, lambda: ("a cat", {}), policy).train()
    after = {n: p.detach() for n, p in policy.trainable_module.named_parameters() if p.requires_grad}
    assert any((after[n] - before[n]).abs().max() > 0 for n in before)
    assert all(torch.isfinite(v).all() for v in after.values())


def test_nft_in_x0_space_is_the_velocity_form_scaled_by_t(tiny_sd3_path):
    """DiffusionNFT's loss on a flow model: with ``x0 = x_t - t v``, the x0-space adaptive loss that diffrl computes
    equals ``t`` times the same loss written on velocities (NVlabs' SD3 form), per sample."""
    policy = StableDiffusion3Policy.from_pretrained(tiny_sd3_path, use_lora=False)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 16, 8, 8, generator=g), torch.randn(3, 16, 8, 8, generator=g)
    T = torch.tensor([900.0, 500.0, 120.0])
    x_t, v_target = policy.schedule.training_pair(x0, noise, T)
    v_theta, v_old = torch.randn(3, 16, 8, 8, generator=g), torch.randn(3, 16, 8, 8, generator=g)
    x0_theta = policy.schedule.x0_from_output(v_theta, x_t, T)
    x0_old = policy.schedule.x0_from_output(v_old, x_t, T)
    plus_x0, minus_x0 = implicit_policies(x0_theta, x0_old, 1.0)
    plus_v, minus_v = implicit_policies(v_theta, v_old, 1.0)
    t = T / 1000
    torch.testing.assert_close(adaptive_mse(plus_x0, x0), t * adaptive_mse(plus_v, v_target), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(adaptive_mse(minus_x0, x0), t * adaptive_mse(minus_v, v_target), rtol=1e-4, atol=1e-6)


def test_grpo_on_sd3_resumes_exactly(tiny_sd3_path, tmp_path):
    def make(run, **kw):
        config = GRPOConfig(**_common(tmp_path, run, num_epochs=3, save_freq=1), prompts_per_epoch=2, group_size=2,
                            sample_batch_size=4, train_batch_size=2, sample_eta=0.7, kl_coef=0.1, **kw)
        policy = StableDiffusion3Policy.from_pretrained(tiny_sd3_path, use_lora=True)
        return GRPOTrainer(config, brightness, lambda: ("a cat", {}), policy)

    straight = make("straight")
    straight.train()
    _, resumed = interrupt_and_resume(make, tmp_path, stop_after=2)
    resumed.train()
    assert_same_run(straight, resumed, tmp_path)


def _diffrl(*args, cwd):
    return subprocess.run([sys.executable, "-m", "diffrl", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_diffrl_train_grpo_saves_a_lora_plain_diffusers_reproduces(tiny_sd3_path, tmp_path):
    (tmp_path / "toy_reward.py").write_text("def bright(images, prompts, metadata):\n"
                                            "    return images.mean(dim=(1, 2, 3)), {}\n")
    out = _diffrl("train", "trainer=grpo", f"model={tiny_sd3_path}", "reward=toy_reward:bright",
                  "prompts=simple_animals", "num_epochs=2", "sample_num_steps=4", "prompts_per_epoch=2",
                  "group_size=2", "sample_batch_size=4", "train_batch_size=4", "train_learning_rate=0.05",
                  "lora_alpha=8", "lora_target_modules=[to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,"
                  "to_add_out]", f"logdir={tmp_path / 'logs'}", "run_name=sd3", "sample_eta=0.7",
                  "sample_guidance_scale=3.0", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    final = tmp_path / "logs" / "sd3" / "final"
    ours = StableDiffusion3Policy.from_pretrained(final)
    assert ours.lora.alpha == 8 and ours.use_lora
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    mine = ours.sample(["a cat", "a dog"], num_inference_steps=4, guidance_scale=3.0, eta=0.0, latents=noise)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_path)
    pipe.set_progress_bar_config(disable=True)
    base = pipe(["a cat", "a dog"], num_inference_steps=4, guidance_scale=3.0, latents=noise.clone(),
                output_type="pt").images
    pipe.load_lora_weights(str(final))
    theirs = pipe(["a cat", "a dog"], num_inference_steps=4, guidance_scale=3.0, latents=noise.clone(),
                  output_type="pt").images
    torch.testing.assert_close(mine.trajectory.images, theirs, rtol=0, atol=1e-4)
    assert (theirs - base).abs().max() > 1e-4  # training moved the adapter away from the base model


def test_a_unet_checkpoint_is_refused_by_a_flow_model_before_loading(tiny_sd_path, tiny_sd3_path, tmp_path):
    (tmp_path / "toy_reward.py").write_text("def bright(images, prompts, metadata):\n"
                                            "    return images.mean(dim=(1, 2, 3)), {}\n")
    common = ["reward=toy_reward:bright", "prompts=simple_animals", "num_epochs=1", "sample_num_steps=2",
              "sample_batch_size=2", "train_batch_size=2", f"logdir={tmp_path / 'logs'}", "save_freq=1"]
    assert _diffrl("train", f"model={tiny_sd_path}", "run_name=unet", *common, cwd=tmp_path).returncode == 0
    out = _diffrl("train", f"model={tiny_sd3_path}", "run_name=flow", "num_epochs=2",
                  f"resume_from={tmp_path / 'logs' / 'unet'}", *common, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert "a Stable Diffusion model" in line and "a Stable Diffusion 3 model" in line and "Fix:" in line
