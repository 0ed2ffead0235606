import pytest
import torch
from PIL import Image

from diffrl import DefaultDDPODDPMPipeline, DefaultDDPOStableDiffusionPipeline
from diffrl.samplers import DeterministicStepError

from .helpers import perturb_trainable


def test_call_returns_images_latents_and_log_probs(tiny_sd_path):
    pipe = DefaultDDPOStableDiffusionPipeline(tiny_sd_path)
    out = pipe(["a cat", "a dog"], num_inference_steps=4, eta=1.0, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 2 and isinstance(out.images[0], Image.Image)
    assert len(out.latents) == 5 and out.latents[0].shape == (2, 4, 8, 8)
    assert len(out.log_probs) == 4 and out.log_probs[0].shape == (2,)
    pt = pipe(["a cat", "a dog"], num_inference_steps=4, eta=1.0, output_type="pt",
              generator=torch.Generator().manual_seed(0))
    assert pt.images.shape == (2, 3, 16, 16)
    for name in ("unet", "vae", "tokenizer", "scheduler", "text_encoder"):
        assert getattr(pipe, name) is not None


def test_eta_zero_log_probs_are_a_clear_error(tiny_sd_path):
    out = DefaultDDPOStableDiffusionPipeline(tiny_sd_path)(["a"], num_inference_steps=2)
    assert len(out.images) == 1
    with pytest.raises(DeterministicStepError, match="eta=0"):
        _ = out.log_probs


def test_scheduler_step_recomputes_the_sampled_log_prob(tiny_sd_path):
    pipe = DefaultDDPOStableDiffusionPipeline(tiny_sd_path)
    perturb_trainable(pipe.policy)
    out = pipe(prompt_embeds=pipe.policy.encode_prompts(["a"], guidance=False).prompt_embeds, guidance_scale=1.0,
               num_inference_steps=3, eta=1.0, output_type="pt", generator=torch.Generator().manual_seed(0))
    embeds = pipe.policy.encode_prompts(["a"], guidance=False).prompt_embeds
    pipe.scheduler.set_timesteps(3)
    for i, t in enumerate(pipe.scheduler.timesteps):
        with torch.no_grad():
            eps = pipe.unet(out.latents[i], t, encoder_hidden_states=embeds).sample
        step = pipe.scheduler_step(eps, t, out.latents[i], eta=1.0, prev_sample=out.latents[i + 1])
        assert torch.allclose(step.log_probs, out.log_probs[i], atol=1e-5)


def test_rgb_with_grad_reaches_trainable_weights(tiny_sd_path):
    pipe = DefaultDDPOStableDiffusionPipeline(tiny_sd_path)
    out = pipe.rgb_with_grad(["a"], num_inference_steps=3, truncated_backprop_rand=False,
                             truncated_backprop_timestep=2, guidance_scale=5.0)
    out.images.mean().backward()
    grads = [p.grad for p in pipe.policy.trainable_parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_rgb_with_grad_draws_its_truncation_step_from_the_generator(tiny_sd_path):
    import random

    pipe = DefaultDDPOStableDiffusionPipeline(tiny_sd_path)
    grads = []
    for global_seed in (1, 2):
        random.seed(global_seed)  # neither global RNG matters once a generator is given
        torch.manual_seed(global_seed)
        pipe.policy.unet.zero_grad(set_to_none=True)
        out = pipe.rgb_with_grad(["a"], num_inference_steps=4, eta=1.0, truncated_rand_backprop_minmax=(0, 4),
                                 generator=torch.Generator().manual_seed(7))
        out.images.mean().backward()
        grads.append([p.grad.clone() for p in pipe.policy.trainable_parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_rgb_with_grad_runs_the_shared_truncation_plan(tiny_sd_path):
    """The UNet runs with autograd exactly at the steps of trl_plan's draw from the same generator."""
    from diffrl.algorithms.truncation import trl_plan

    pipe = DefaultDDPOStableDiffusionPipeline(tiny_sd_path)
    seen = []
    hook = pipe.policy.trainable_module.register_forward_hook(lambda m, i, o: seen.append(torch.is_grad_enabled()))
    try:
        for seed in range(6):
            seen.clear()
            pipe.rgb_with_grad(["a"], num_inference_steps=4, eta=1.0, guidance_scale=1.0, gradient_checkpoint=False,
                               truncated_rand_backprop_minmax=(1, 4), generator=torch.Generator().manual_seed(seed))
            expected = trl_plan(4, truncated_rand_backprop_minmax=(1, 4),
                                generator=torch.Generator().manual_seed(seed)).grad_steps
            assert seen == expected
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="truncated_rand_backprop_minmax"):
        pipe.rgb_with_grad(["a"], num_inference_steps=4, truncated_rand_backprop_minmax=(0, 50))


def test_ddpm_pipeline_has_the_same_surface(tiny_ddpm_path, tmp_path):
    pipe = DefaultDDPODDPMPipeline(tiny_ddpm_path, use_lora=True)
    out = pipe(["", ""], num_inference_steps=3, eta=1.0, output_type="pt")
    assert out.images.shape == (2, 3, 8, 8) and len(out.log_probs) == 3
    pipe.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_accelerate_hooks_save_and_restore_the_trainable_weights(tiny_sd_path, tmp_path, use_lora):
    pipe = DefaultDDPOStableDiffusionPipeline(tiny_sd_path, use_lora=use_lora)
    perturb_trainable(pipe.policy, seed=4)
    saved = pipe.policy.trainable_state_dict()
    weights = [object()]
    pipe.save_checkpoint([pipe.unet], weights, str(tmp_path))
    assert weights == []  # claimed, so accelerate does not save the module a second time
    fresh = DefaultDDPOStableDiffusionPipeline(tiny_sd_path, use_lora=use_lora)
    models = [fresh.unet]
    fresh.load_checkpoint(models, str(tmp_path))
    assert models == []
    restored = fresh.policy.trainable_state_dict()
    assert set(restored) == set(saved) and all(torch.equal(restored[n], saved[n]) for n in saved)
