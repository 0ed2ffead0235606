import pytest
import torch

from diffrl.pipelines import DDPMPolicy, StableDiffusionPolicy

from .helpers import perturb_trainable, recompute_log_probs

PROMPTS = ["a cat", "a dog riding a bike", "", "a chess board"]


def _sd(path, use_lora, **kw):
    policy = StableDiffusionPolicy.from_pretrained(path, use_lora=use_lora, **kw)
    perturb_trainable(policy)
    return policy


def _ddpm(path, use_lora, **kw):
    policy = DDPMPolicy.from_pretrained(path, use_lora=use_lora, **kw)
    perturb_trainable(policy)
    return policy


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0], ids=["no-cfg", "cfg"])
def test_sd_importance_ratio_is_one(tiny_sd_path, use_lora, guidance_scale):
    policy = _sd(tiny_sd_path, use_lora)
    with torch.no_grad():
        traj = policy.sample(PROMPTS, num_inference_steps=6, guidance_scale=guidance_scale, eta=1.0,
                             generator=torch.Generator().manual_seed(0)).trajectory
        recomputed = recompute_log_probs(policy, traj, eta=1.0, guidance_scale=guidance_scale, chunk=3)
    ratio = torch.exp(recomputed - traj.log_probs)
    assert traj.log_probs.shape == (4, 6)
    assert (ratio - 1).abs().max() < 1e-5


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_ddpm_importance_ratio_is_one(tiny_ddpm_path, use_lora, sampler):
    policy = _ddpm(tiny_ddpm_path, use_lora, sampler=sampler)
    with torch.no_grad():
        traj = policy.sample(batch_size=4, num_inference_steps=8, eta=1.0,
                             generator=torch.Generator().manual_seed(1)).trajectory
        recomputed = recompute_log_probs(policy, traj, eta=1.0, guidance_scale=1.0, chunk=1)
    assert (torch.exp(recomputed - traj.log_probs) - 1).abs().max() < 1e-5


def test_recomputed_log_prob_moves_when_weights_move(tiny_ddpm_path):
    policy = _ddpm(tiny_ddpm_path, True)
    with torch.no_grad():
        traj = policy.sample(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(1)).trajectory
    perturb_trainable(policy, scale=0.5, seed=9)
    with torch.no_grad():
        recomputed = recompute_log_probs(policy, traj, eta=1.0, guidance_scale=1.0, chunk=2)
    assert (recomputed - traj.log_probs).abs().max() > 1e-4


def test_step_log_prob_has_gradients_to_trainable_weights(tiny_sd_path):
    policy = _sd(tiny_sd_path, True)
    with torch.no_grad():
        traj = policy.sample(PROMPTS[:2], num_inference_steps=3, generator=torch.Generator().manual_seed(0)).trajectory
    step = policy.step_log_prob(traj.latents[:, 1], traj.timesteps[:, 1], traj.prev_timesteps[:, 1],
                                traj.latents[:, 2], traj.conditioning, eta=1.0, guidance_scale=5.0)
    step.log_prob.sum().backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    assert grads and all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    frozen = [p for p in policy.pipeline.vae.parameters()] + [p for p in policy.pipeline.text_encoder.parameters()]
    assert all(p.grad is None for p in frozen)


def test_same_seed_same_trajectory_and_images(tiny_sd_path, tiny_ddpm_path):
    sd = _sd(tiny_sd_path, True)
    a = sd.sample(PROMPTS, num_inference_steps=4, generator=torch.Generator().manual_seed(3)).trajectory
    torch.manual_seed(12345)  # the global RNG must play no part
    b = sd.sample(PROMPTS, num_inference_steps=4, generator=torch.Generator().manual_seed(3)).trajectory
    c = sd.sample(PROMPTS, num_inference_steps=4, generator=torch.Generator().manual_seed(4)).trajectory
    assert torch.equal(a.images, b.images) and torch.equal(a.latents, b.latents)
    assert torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.latents[:, 1:], c.latents[:, 1:])
    # same initial noise, different per-step noise: the generator drives the step noise too
    x_T = a.latents[:, 0]
    d = sd.sample(PROMPTS, num_inference_steps=4, latents=x_T, generator=torch.Generator().manual_seed(99)).trajectory
    assert not torch.equal(a.latents[:, -1], d.latents[:, -1])

    ddpm = _ddpm(tiny_ddpm_path, True)
    e = ddpm.sample(batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(3)).trajectory
    f = ddpm.sample(batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(3)).trajectory
    assert torch.equal(e.images, f.images) and torch.equal(e.latents, f.latents)


def test_outputs_are_images_in_unit_range(tiny_sd_path, tiny_ddpm_path):
    traj = _sd(tiny_sd_path, True).sample(["x"], num_inference_steps=2).trajectory
    assert traj.images.shape == (1, 3, 16, 16) and traj.images.dtype == torch.float32
    assert 0 <= traj.images.min() and traj.images.max() <= 1
    assert traj.latents.shape == (1, 3, 4, 8, 8) and traj.timesteps.shape == (1, 2)
    one_channel = DDPMPolicy(__import__("diffrl.testing.models", fromlist=["x"]).build_tiny_ddpm(channels=1))
    images = one_channel.sample(batch_size=2, num_inference_steps=2).trajectory.images
    assert images.shape == (2, 3, 8, 8)


def test_eta_zero_samples_without_log_probs(tiny_sd_path):
    policy = _sd(tiny_sd_path, True)
    traj = policy.sample(["a"], num_inference_steps=3, eta=0.0, generator=torch.Generator().manual_seed(0)).trajectory
    assert torch.equal(traj.log_probs, torch.zeros_like(traj.log_probs))
    from diffrl.samplers import DeterministicStepError

    with pytest.raises(DeterministicStepError, match="eta = 0"):
        policy.step_log_prob(traj.latents[:, 0], traj.timesteps[:, 0], traj.prev_timesteps[:, 0],
                             traj.latents[:, 1], traj.conditioning, eta=0.0)


def test_bf16_keeps_trainable_weights_and_log_probs_in_float32(tiny_sd_path):
    policy = _sd(tiny_sd_path, True, mixed_precision="bf16")
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    assert policy.pipeline.vae.dtype == torch.bfloat16
    with torch.no_grad():
        traj = policy.sample(PROMPTS[:2], num_inference_steps=3, generator=torch.Generator().manual_seed(0)).trajectory
        recomputed = recompute_log_probs(policy, traj, eta=1.0, guidance_scale=5.0, chunk=2)
    assert traj.log_probs.dtype == torch.float32
    assert (torch.exp(recomputed - traj.log_probs) - 1).abs().max() < 1e-5


def test_negative_prompts_change_the_sample(tiny_sd_path):
    policy = _sd(tiny_sd_path, True)
    a = policy.sample(["a cat"], num_inference_steps=3, generator=torch.Generator().manual_seed(0)).trajectory
    b = policy.sample(["a cat"], negative_prompts="blurry", num_inference_steps=3,
                      generator=torch.Generator().manual_seed(0)).trajectory
    assert not torch.equal(a.images, b.images)
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        policy.sample(["a cat"], negative_prompts=["x", "y"], num_inference_steps=2)


def test_bad_lora_targets_name_the_modules(tiny_ddpm_path):
    from diffrl.pipelines import LoraSettings

    with pytest.raises(ValueError, match="match no layer"):
        DDPMPolicy.from_pretrained(tiny_ddpm_path, lora=LoraSettings(target_modules=("nonexistent",)))
