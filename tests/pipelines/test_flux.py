"""FLUX.1 as a policy: exact log-probabilities of the flow SDE on packed latents, FLUX.1-dev's guidance embedding
(and FLUX.1-schnell without one), diffusers' LoRA layout, and the refusal of classifier-free guidance."""

import math
import subprocess
import sys

import pytest
import torch
from diffusers import FluxPipeline

from diffrl.pipelines import FluxPolicy, LoraSettings, PooledTextConditioning
from diffrl.pipelines.auto import load_policy, model_kind
from diffrl.testing.flow import save_tiny_flux

from .helpers import perturb_trainable, recompute_log_probs

PROMPTS = ["a cat", "a dog riding a bike", ""]
SIZE = dict(height=16, width=16)


def _policy(path, use_lora=True, scale=0.2, **kw):
    policy = FluxPolicy.from_pretrained(path, use_lora=use_lora, **kw)
    perturb_trainable(policy, scale=scale)
    return policy


@pytest.fixture(scope="module")
def schnell_path(tmp_path_factory):
    return str(save_tiny_flux(tmp_path_factory.mktemp("tiny-schnell"), guidance_embeds=False))


def test_detected_and_loaded_with_dev_guidance(tiny_flux_path, schnell_path):
    assert model_kind(tiny_flux_path) == "flux"
    policy = load_policy(tiny_flux_path)
    assert type(policy) is FluxPolicy and policy.guidance == 3.5
    assert FluxPolicy.from_pretrained(tiny_flux_path, guidance=2.0).guidance == 2.0
    assert FluxPolicy.from_pretrained(schnell_path).guidance is None
    with pytest.raises(ValueError, match="no guidance embedding"):
        FluxPolicy.from_pretrained(schnell_path, guidance=3.5)


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("model", ["dev", "schnell"])
def test_importance_ratio_is_one_at_every_step(tiny_flux_path, schnell_path, use_lora, model):
    policy = _policy(tiny_flux_path if model == "dev" else schnell_path, use_lora)
    with torch.no_grad():
        traj = policy.sample(PROMPTS, num_inference_steps=5, eta=0.7, generator=torch.Generator().manual_seed(0),
                             **SIZE).trajectory
        recomputed = recompute_log_probs(policy, traj, eta=0.7, guidance_scale=1.0, chunk=2)
    assert traj.latents.shape == (3, 6, 4, 8, 8) and isinstance(traj.conditioning, PooledTextConditioning)
    assert traj.conditioning.negative_prompt_embeds is None
    assert (torch.exp(recomputed - traj.log_probs) - 1).abs().max() < 1e-5
    again = policy.sample(PROMPTS, num_inference_steps=5, eta=0.7, generator=torch.Generator().manual_seed(0),
                          **SIZE).trajectory
    assert torch.equal(again.latents, traj.latents) and torch.equal(again.log_probs, traj.log_probs)


def test_the_schedule_is_fluxs_with_the_resolution_shift(tiny_flux_path):
    policy = _policy(tiny_flux_path)
    traj = policy.sample(["a cat"], num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                         **SIZE).trajectory
    pipe = FluxPipeline.from_pretrained(tiny_flux_path)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    import numpy as np

    pipe.scheduler.set_timesteps(4, sigmas=np.linspace(1.0, 1 / 4, 4), mu=calculate_shift(16))  # 4x4 packed tokens
    torch.testing.assert_close(traj.timesteps[0], pipe.scheduler.timesteps)
    assert float(traj.prev_timesteps[0, -1]) == 0.0


def test_log_probs_equal_an_independent_recomputation_with_plain_diffusers(tiny_flux_path, tmp_path):
    """Flow-GRPO's SDE (Liu et al. 2025, eq. 9) written out on plain diffusers' FLUX transformer (the LoRA merged by
    diffusers), with diffusers' own packing helpers and FLUX.1-dev's guidance embedding."""
    policy = _policy(tiny_flux_path)
    a = 0.7
    with torch.no_grad():
        traj = policy.sample(PROMPTS[:2], num_inference_steps=4, eta=a, generator=torch.Generator().manual_seed(5),
                             **SIZE).trajectory
    policy.save_pretrained(tmp_path / "lora")
    pipe = FluxPipeline.from_pretrained(tiny_flux_path)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    cond = traj.conditioning
    sigma_max = float(traj.prev_timesteps[0, 0]) / 1000
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
    for i in range(4):
        x = traj.latents[:, i]
        with torch.no_grad():
            out = pipe.transformer(hidden_states=FluxPipeline._pack_latents(x, 2, 4, 8, 8),
                                   timestep=traj.timesteps[:, i] / 1000, guidance=torch.full((2,), 3.5),
                                   pooled_projections=cond.pooled_prompt_embeds,
                                   encoder_hidden_states=cond.prompt_embeds,
                                   txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3), img_ids=ids).sample
        v = FluxPipeline._unpack_latents(out, 16, 16, 2).double()
        t, t_next = float(traj.timesteps[0, i]) / 1000, float(traj.prev_timesteps[0, i]) / 1000
        s = a * math.sqrt(t / (1 - (sigma_max if t == 1.0 else t)))
        x = x.double()
        mean = x + (v + s ** 2 / (2 * t) * (x + (1 - t) * v)) * (t_next - t)
        std = s * math.sqrt(t - t_next)
        y = traj.latents[:, i + 1].double()
        log_prob = (-((y - mean) ** 2) / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
        torch.testing.assert_close(traj.log_probs[:, i].double(), log_prob, rtol=0, atol=2e-4)


def test_lora_loads_into_plain_diffusers_and_reproduces_the_images(tiny_flux_path, tmp_path):
    """alpha 8 at rank 4 (diffusers must read it from the file), FLUX's attention and feed-forward projections."""
    targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    policy = _policy(tiny_flux_path, lora=LoraSettings(rank=4, alpha=8, target_modules=targets))
    policy.save_pretrained(tmp_path / "lora")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    ours = policy.sample(["a cat", "a dog"], num_inference_steps=4, eta=0.0, latents=noise, **SIZE).trajectory.images
    pipe = FluxPipeline.from_pretrained(tiny_flux_path)
    pipe.set_progress_bar_config(disable=True)
    packed = FluxPipeline._pack_latents(noise, 2, 4, 8, 8)
    base = pipe(["a cat", "a dog"], num_inference_steps=4, latents=packed.clone(), output_type="pt", **SIZE).images
    pipe.load_lora_weights(str(tmp_path / "lora"))
    theirs = pipe(["a cat", "a dog"], num_inference_steps=4, latents=packed.clone(), output_type="pt", **SIZE).images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert (theirs - base).abs().max() > 1e-3
    resumed = load_policy(tmp_path / "lora")
    assert type(resumed) is FluxPolicy and resumed.lora.alpha == 8


def test_classifier_free_guidance_is_refused(tiny_flux_path):
    policy = _policy(tiny_flux_path)
    with pytest.raises(ValueError, match="guidance-distilled"):
        policy.sample(["a cat"], num_inference_steps=2, guidance_scale=4.0, **SIZE)
    with pytest.raises(ValueError, match="negative prompts"):
        policy.sample(["a cat"], num_inference_steps=2, negative_prompts="blurry", **SIZE)


def _diffrl(*args, cwd):
    return subprocess.run([sys.executable, "-m", "diffrl", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.mark.parametrize("setting, words", [
    ("sample_guidance_scale=4.5", "sample_guidance_scale=4.5: is classifier-free guidance"),
    ("negative_prompts=blurry", "negative_prompts='blurry': need classifier-free guidance"),
    ("model_options.guidance=-1", "model_options.guidance=-1: must be a positive number"),
    ("model_options.sampler=ddpm", "model_options.sampler='ddpm': is not an option of"),
])
def test_bad_flux_settings_are_refused_before_loading(tiny_flux_path, tmp_path, setting, words):
    from diffrl import build
    from diffrl.config import ConfigError, load_config

    config = load_config(None, [f"model={tiny_flux_path}", "prompts=simple_animals", "sample_guidance_scale=1",
                                setting, f"logdir={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        build.check_model_settings(config)  # reads model_index.json only
    assert words in str(err.value) and "Fix:" in str(err.value)


def test_the_cli_refuses_cfg_on_flux_in_one_line(tiny_flux_path, tmp_path):
    out = _diffrl("train", f"model={tiny_flux_path}", "reward=aesthetic", "prompts=simple_animals",
                  "sample_guidance_scale=4.5", f"logdir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "a FLUX.1 model (guidance-distilled)" in out.stderr


def test_diffrl_train_grpo_with_a_flux_lora(tiny_flux_path, tmp_path):
    """The CLI's path on FLUX.1-dev: GRPO with the reference KL, LoRA; the result is a FLUX LoRA diffrl and
    diffusers load, and the guidance embedding it trained at is recorded."""
    (tmp_path / "toy_reward.py").write_text("def bright(images, prompts, metadata):\n"
                                            "    return images.mean(dim=(1, 2, 3)), {}\n")
    out = _diffrl("train", "trainer=grpo", f"model={tiny_flux_path}", "reward=toy_reward:bright",
                  "prompts=simple_animals", "num_epochs=2", "sample_num_steps=4", "prompts_per_epoch=2",
                  "group_size=2", "sample_batch_size=4", "train_batch_size=4", "sample_height=16", "sample_width=16",
                  "sample_guidance_scale=1", "sample_eta=0.7", "kl_coef=0.04", "model_options.guidance=3.0",
                  "model_options.max_sequence_length=32", f"logdir={tmp_path / 'logs'}", "run_name=flux",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    final = tmp_path / "logs" / "flux" / "final"
    import json

    info = json.loads((final / "diffrl_model.json").read_text())
    assert info["kind"] == "flux" and info["guidance"] == 3.0 and info["max_sequence_length"] == 32
    pipe = FluxPipeline.from_pretrained(tiny_flux_path)
    pipe.load_lora_weights(str(final))
