"""Stable Diffusion 3 as a policy: exact log-probabilities of the flow SDE, diffusers' LoRA layout, the family's
refusals. On the tiny random-weight SD3 of :mod:`diffrl.testing.flow`, loaded from disk as a real model is."""

import json
import math

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from diffrl.pipelines import LoraSettings, PooledTextConditioning, StableDiffusion3Policy
from diffrl.pipelines.auto import load_policy, model_kind
from diffrl.testing.flow import save_tiny_sd3

from .helpers import perturb_trainable, recompute_log_probs

PROMPTS = ["a cat", "a dog riding a bike", ""]


def _policy(path, use_lora=True, scale=0.05, **kw):
    policy = StableDiffusion3Policy.from_pretrained(path, use_lora=use_lora, **kw)
    perturb_trainable(policy, scale=scale)
    return policy


def _diffusers_pipe(path):
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_detected_from_model_index_and_loaded_through_the_auto_loader(tiny_sd3_path):
    assert model_kind(tiny_sd3_path) == "sd3"
    policy = load_policy(tiny_sd3_path, use_lora=True)
    assert type(policy) is StableDiffusion3Policy and policy.trainable_module is policy.pipeline.transformer
    names = [n for n, p in policy.trainable_module.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0], ids=["no-cfg", "cfg"])
def test_importance_ratio_is_one_at_every_step(tiny_sd3_path, use_lora, guidance_scale, sde_type):
    policy = _policy(tiny_sd3_path, use_lora, sde_type=sde_type)
    with torch.no_grad():
        traj = policy.sample(PROMPTS, num_inference_steps=5, guidance_scale=guidance_scale, eta=0.7,
                             generator=torch.Generator().manual_seed(0)).trajectory
        recomputed = recompute_log_probs(policy, traj, eta=0.7, guidance_scale=guidance_scale, chunk=2)
    assert traj.log_probs.shape == (3, 5) and traj.log_probs.dtype == torch.float32
    assert isinstance(traj.conditioning, PooledTextConditioning)
    assert (traj.conditioning.negative_prompt_embeds is None) == (guidance_scale == 1.0)
    stochastic = traj.stochastic[0].tolist()
    assert stochastic == ([True] * 5 if sde_type == "sde" else [True] * 4 + [False])  # CPS: std 0 at t' = 0
    assert (torch.exp(recomputed - traj.log_probs) - 1).abs().max() < 1e-5
    if sde_type == "cps":  # the deterministic last step: log-probability 0 recorded and recomputed
        assert torch.equal(traj.log_probs[:, -1], torch.zeros(3)) and torch.equal(recomputed[:, -1], torch.zeros(3))


def test_same_seed_same_trajectory_and_the_schedule_is_diffusers(tiny_sd3_path):
    policy = _policy(tiny_sd3_path)
    a = policy.sample(PROMPTS, num_inference_steps=4, generator=torch.Generator().manual_seed(3)).trajectory
    torch.manual_seed(12345)  # the global RNG plays no part
    b = policy.sample(PROMPTS, num_inference_steps=4, generator=torch.Generator().manual_seed(3)).trajectory
    c = policy.sample(PROMPTS, num_inference_steps=4, generator=torch.Generator().manual_seed(4)).trajectory
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.latents[:, 1:], c.latents[:, 1:])
    assert a.images.shape == (3, 3, 16, 16) and a.latents.shape == (3, 5, 16, 8, 8)
    scheduler = _diffusers_pipe(tiny_sd3_path).scheduler
    scheduler.set_timesteps(4)
    torch.testing.assert_close(a.timesteps[0], scheduler.timesteps)  # SD3's shifted sigmas, times 1000
    torch.testing.assert_close(a.prev_timesteps[0], scheduler.sigmas[1:] * 1000)
    assert float(a.prev_timesteps[0, -1]) == 0.0  # the last step lands on the data


def test_log_probs_equal_an_independent_recomputation_with_plain_diffusers(tiny_sd3_path):
    """Each recorded transition's log-probability is the Gaussian of Flow-GRPO's SDE (Liu et al. 2025, eq. 9),
    written out here on plain diffusers' transformer (with the LoRA merged by diffusers itself)."""
    policy = _policy(tiny_sd3_path, scale=0.2)
    a, guidance = 0.7, 3.0
    with torch.no_grad():
        traj = policy.sample(PROMPTS[:2], num_inference_steps=4, guidance_scale=guidance, eta=a,
                             generator=torch.Generator().manual_seed(5)).trajectory
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        policy.save_pretrained(tmp)
        pipe = _diffusers_pipe(tiny_sd3_path)
        pipe.load_lora_weights(tmp)
    cond = traj.conditioning
    sigmas = traj.timesteps[0].double() / 1000
    sigma_max = float(traj.prev_timesteps[0, 0]) / 1000  # the schedule's second sigma (Flow-GRPO's sigma_max)
    for i in range(4):
        x = traj.latents[:, i]
        t = float(sigmas[i])
        t_next = float(traj.prev_timesteps[0, i]) / 1000
        with torch.no_grad():
            out = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=traj.timesteps[:, i].repeat(2),
                                   encoder_hidden_states=torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds]),
                                   pooled_projections=torch.cat([cond.negative_pooled_prompt_embeds,
                                                                 cond.pooled_prompt_embeds])).sample
        uncond, text = out.double().chunk(2)
        v = uncond + guidance * (text - uncond)
        x = x.double()
        s = a * math.sqrt(t / (1 - (sigma_max if t == 1.0 else t)))
        dt = t_next - t
        mean = x + (v + s ** 2 / (2 * t) * (x + (1 - t) * v)) * dt
        std = s * math.sqrt(-dt)
        y = traj.latents[:, i + 1].double()
        log_prob = (-((y - mean) ** 2) / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
        torch.testing.assert_close(traj.log_probs[:, i].double(), log_prob, rtol=0, atol=2e-4)


def test_lora_loads_into_plain_diffusers_and_reproduces_the_ode_samples(tiny_sd3_path, tmp_path):
    """alpha 8 at rank 4: diffusers must read the alpha from the file's metadata, or it loads at half the scale."""
    policy = _policy(tiny_sd3_path, scale=0.2, lora=LoraSettings(rank=4, alpha=8,
                                                                 target_modules=("to_q", "to_k", "to_v", "to_out.0",
                                                                                 "add_q_proj", "add_k_proj",
                                                                                 "add_v_proj", "to_add_out")))
    policy.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    prompts = ["a cat", "a dog"]
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(7))
    for guidance in (1.0, 4.5):
        ours = policy.sample(prompts, num_inference_steps=5, guidance_scale=guidance, eta=0.0, latents=noise)
        pipe = _diffusers_pipe(tiny_sd3_path)
        base = pipe(prompts, num_inference_steps=5, guidance_scale=guidance, latents=noise.clone(),
                    output_type="latent").images
        pipe.load_lora_weights(str(tmp_path / "lora"))
        theirs = pipe(prompts, num_inference_steps=5, guidance_scale=guidance, latents=noise.clone(),
                      output_type="latent").images
        torch.testing.assert_close(ours.trajectory.latents[:, -1], theirs, rtol=0, atol=1e-4)
        assert (theirs - base).abs().max() > 1e-2  # the adapter really changes the samples
        images = pipe(prompts, num_inference_steps=5, guidance_scale=guidance, latents=noise.clone(),
                      output_type="pt").images
        torch.testing.assert_close(ours.trajectory.images, images, rtol=0, atol=1e-4)  # shift_factor decoding


def test_lora_result_continues_training_and_full_results_are_pipeline_folders(tiny_sd3_path, tmp_path):
    policy = _policy(tiny_sd3_path, scale=0.2, sde_type="cps")
    policy.save_pretrained(tmp_path / "lora")
    info = json.loads((tmp_path / "lora" / "diffrl_model.json").read_text())
    assert info["kind"] == "sd3" and info["base_model"] == tiny_sd3_path and info["sde_type"] == "cps"
    resumed = load_policy(tmp_path / "lora")
    assert type(resumed) is StableDiffusion3Policy
    for (name, p), q in zip(policy.trainable_module.named_parameters(), resumed.trainable_module.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q, p.detach(), msg=name)
    full = _policy(tiny_sd3_path, use_lora=False, scale=0.01)
    full.save_pretrained(tmp_path / "full")
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "full")
    for (n, p), q in zip(full.trainable_module.named_parameters(), pipe.transformer.parameters()):
        torch.testing.assert_close(p.detach(), q, msg=n)
    full.save_merged(tmp_path / "merged")
    policy.save_merged(tmp_path / "merged_lora")
    merged = StableDiffusion3Pipeline.from_pretrained(tmp_path / "merged_lora")
    x, t = torch.randn(1, 16, 8, 8), torch.tensor([700.0])
    cond = policy.encode_prompts(["a cat"], guidance=False)
    with torch.no_grad():
        torch.testing.assert_close(
            merged.transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond.prompt_embeds,
                               pooled_projections=cond.pooled_prompt_embeds).sample,
            policy.predict(x, t, cond, 1.0), rtol=0, atol=1e-5)


def test_without_t5_as_diffusers_allows(tmp_path):
    path = save_tiny_sd3(tmp_path / "no-t5", with_t5=False)
    policy = StableDiffusion3Policy.from_pretrained(path)
    assert policy.pipeline.text_encoder_3 is None
    with torch.no_grad():
        traj = policy.sample(["a cat"], num_inference_steps=3, generator=torch.Generator().manual_seed(0)).trajectory
        recomputed = recompute_log_probs(policy, traj, eta=0.7, guidance_scale=5.0)
    assert torch.equal(recomputed, traj.log_probs)


def test_reference_params_give_the_base_model_and_gradients_reach_the_adapter_only(tiny_sd3_path):
    policy = _policy(tiny_sd3_path, scale=0.2)
    base = StableDiffusion3Policy.from_pretrained(tiny_sd3_path, use_lora=False)
    cond = policy.encode_prompts(["a cat", "a dog"])
    x, t = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([900.0, 30.0])
    with torch.no_grad():
        tuned = policy.predict(x, t, cond, 4.0)
        ref = policy.predict(x, t, cond, 4.0, params=policy.reference_params())
        plain = base.predict(x, t, cond, 4.0)
    torch.testing.assert_close(ref, plain, rtol=1e-5, atol=1e-5)
    assert (tuned - plain).abs().max() > 1e-4
    with torch.no_grad():
        traj = policy.sample(["a cat"], num_inference_steps=3, generator=torch.Generator().manual_seed(0)).trajectory
    step = policy.step_log_prob(traj.latents[:, 1], traj.timesteps[:, 1], traj.prev_timesteps[:, 1],
                                traj.latents[:, 2], traj.conditioning, eta=0.7, guidance_scale=5.0)
    step.log_prob.sum().backward()
    grads = {n: p.grad for n, p in policy.trainable_module.named_parameters() if p.requires_grad}
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())
    frozen = [p for p in policy.trainable_module.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_exports_refuse_the_unet_formats(tiny_sd3_path, tmp_path):
    policy = _policy(tiny_sd3_path)
    with pytest.raises(ValueError, match="no kohya LoRA format"):
        policy.save_kohya_lora(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="no single-file checkpoint export"):
        policy.save_single_file(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="sde_type"):
        StableDiffusion3Policy.from_pretrained(tiny_sd3_path, sde_type="ode")


def test_bf16_weights_keep_float32_latents_and_an_exact_ratio(tiny_sd3_path, tiny_flux_path):
    """Flow-GRPO's FAQ: bf16 breaks ratio = 1 when the step runs in bf16. Here the weights are bf16, the latents
    and log-probabilities float32 (the step itself float64), and a recomputation equals the record exactly."""
    from diffrl.pipelines import FluxPolicy

    for cls, path in ((StableDiffusion3Policy, tiny_sd3_path), (FluxPolicy, tiny_flux_path)):
        policy = cls.from_pretrained(path, mixed_precision="bf16")
        assert policy.pipeline.text_encoder.dtype == torch.bfloat16
        assert next(policy.trainable_module.parameters()).dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())  # the LoRA weights
        with torch.no_grad():
            traj = policy.sample(["a cat", "a dog"], num_inference_steps=4, guidance_scale=1.0, height=16, width=16,
                                 generator=torch.Generator().manual_seed(0)).trajectory
            recomputed = recompute_log_probs(policy, traj, eta=0.7, guidance_scale=1.0, chunk=2)
        assert traj.latents.dtype == traj.log_probs.dtype == torch.float32
        assert torch.equal(recomputed, traj.log_probs), cls.__name__


def test_text_encoders_on_cpu_and_without_t5_from_a_runs_options(tiny_sd3_path, tmp_path):
    """``model_options.text_encoders_on_cpu`` and ``use_t5`` decide how the weights load: the run passes them to
    ``from_pretrained`` (no encoder reaches the accelerator, T5 is never loaded); the states equal on-device ones."""
    from diffrl import GRPOConfig, build

    config = GRPOConfig(model=tiny_sd3_path, model_options={"text_encoders_on_cpu": True, "use_t5": False},
                        logdir=str(tmp_path))
    policy = build.build_policy(config)
    assert policy.text_encoders_on_cpu and policy.pipeline.text_encoder_3 is None
    assert policy.pipeline.text_encoder.device.type == "cpu"
    reference = StableDiffusion3Policy.from_pretrained(tiny_sd3_path, use_t5=False)
    a, b = policy.encode_prompts(["a cat"]), reference.encode_prompts(["a cat"])
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    bad = GRPOConfig(model=tiny_sd3_path, model_options={"use_t5": "no"}, logdir=str(tmp_path))
    from diffrl.config import ConfigError

    with pytest.raises(ConfigError, match="model_options.use_t5='no': must be true or false"):
        build.check_model_settings(bad)
