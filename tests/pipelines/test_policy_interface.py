"""The DiffusionPolicy interface trainers use: modules, trainable weights, parameter overrides, the reference."""

import pytest
import torch

from diffrl.pipelines import DDPMPolicy, DiffusionPolicy, StableDiffusionPolicy, TextConditioning

from .helpers import perturb_trainable

PROMPTS = ["a cat", "a dog"]


def _sd(path, use_lora=True, seed=0, **kw):
    policy = StableDiffusionPolicy.from_pretrained(path, use_lora=use_lora, **kw)
    perturb_trainable(policy, seed=seed)
    return policy


def _inputs(policy, guidance=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([700, 300])
    return x, t, policy.encode_prompts(PROMPTS, guidance=guidance)


def test_policies_implement_the_protocol(tiny_sd_path, tiny_ddpm_path):
    sd, ddpm = _sd(tiny_sd_path), DDPMPolicy.from_pretrained(tiny_ddpm_path)
    for policy in (sd, ddpm):
        assert isinstance(policy, DiffusionPolicy)
        assert policy.trainable_module is policy._unet is policy.unet


def test_use_forward_module_is_what_predict_calls(tiny_sd_path):
    policy = _sd(tiny_sd_path)
    calls = []

    class Wrapper(torch.nn.Module):  # stands in for accelerate's DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            calls.append(1)
            return self.module(*args, **kwargs)

    x, t, cond = _inputs(policy)
    before = policy.predict(x, t, cond, 4.0)
    policy.use_forward_module(Wrapper(policy.trainable_module))
    after = policy.predict(x, t, cond, 4.0)
    assert calls == [1] and torch.equal(before, after)
    assert policy.trainable_module is policy._unet  # still the bare UNet
    assert set(policy.trainable_state_dict()) == {n for n, p in policy._unet.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_trainable_state_round_trips_into_a_fresh_policy(tiny_sd_path, use_lora):
    trained = _sd(tiny_sd_path, use_lora, seed=1)
    state = trained.trainable_state_dict()
    names = {n for n, p in trained.trainable_module.named_parameters() if p.requires_grad}
    assert set(state) == names
    assert all(v.device.type == "cpu" and v.is_contiguous() and not v.requires_grad for v in state.values())
    name = next(iter(state))
    param = dict(trained.trainable_module.named_parameters())[name]
    assert state[name].data_ptr() != param.data_ptr()  # a copy, not a view of the live weights
    fresh = StableDiffusionPolicy.from_pretrained(tiny_sd_path, use_lora=use_lora)
    x, t, cond = _inputs(fresh)
    with torch.no_grad():
        assert not torch.equal(fresh.predict(x, t, cond, 4.0), trained.predict(x, t, cond, 4.0))
        fresh.load_trainable_state_dict(state)
        assert torch.equal(fresh.predict(x, t, cond, 4.0), trained.predict(x, t, cond, 4.0))


def test_mismatched_trainable_state_names_keys_and_fix(tiny_sd_path):
    lora_state = _sd(tiny_sd_path, True).trainable_state_dict()
    full = StableDiffusionPolicy.from_pretrained(tiny_sd_path, use_lora=False)
    with pytest.raises(ValueError, match=r"missing.*unexpected.*same model, use_lora and LoRA settings") as err:
        full.load_trainable_state_dict(lora_state, source="ckpt/trainable.safetensors")
    assert "lora_A" in str(err.value) and "ckpt/trainable.safetensors" in str(err.value)


def test_params_override_the_trainable_weights_for_one_call(tiny_sd_path):
    a, b = _sd(tiny_sd_path, seed=0), _sd(tiny_sd_path, seed=1)
    x, t, cond = _inputs(a)
    b_params = {n: v.clone() for n, v in b.trainable_state_dict().items()}
    with torch.no_grad():
        assert torch.equal(a.predict(x, t, cond, 4.0, params=b_params), b.predict(x, t, cond, 4.0))
        assert not torch.equal(a.predict(x, t, cond, 4.0), b.predict(x, t, cond, 4.0))
    # Gradients go into the given tensors, not into the policy's own weights ...
    for v in b_params.values():
        v.requires_grad_(True)
    a.predict(x, t, cond, 4.0, params=b_params).square().mean().backward()
    assert all(p.grad is None for p in a.trainable_parameters())
    assert sum(float(v.grad.abs().sum()) for v in b_params.values()) > 0
    # ... and without params they reach the trainable weights as before.
    step = a.step_log_prob(x, t, torch.tensor([600, 200]), x * 0.9, cond, eta=1.0, guidance_scale=4.0)
    step.log_prob.sum().backward()
    assert all(p.grad is not None for p in a.trainable_parameters())


def test_lora_reference_is_the_base_model_exactly_and_costs_no_memory(tiny_sd_path):
    policy = _sd(tiny_sd_path, True, seed=2)
    base = StableDiffusionPolicy.from_pretrained(tiny_sd_path, use_lora=False)  # the weights before LoRA
    ref = policy.reference_params()
    ups = [v for n, v in ref.items() if "lora_B" in n]
    assert ups and all(v.stride() == (0,) * v.ndim and not v.any() for v in ups)  # zeros, no storage per element
    x, t, cond = _inputs(policy)
    out = policy.predict(x, t, cond, 4.0, params=ref)
    assert not out.requires_grad  # no path to any trainable weight
    with torch.no_grad():
        assert torch.equal(out, base.predict(x, t, cond, 4.0))
        assert not torch.equal(out, policy.predict(x, t, cond, 4.0))


def test_full_reference_is_the_snapshot_of_the_initial_weights(tiny_sd_path):
    policy = StableDiffusionPolicy.from_pretrained(tiny_sd_path, use_lora=False)
    with pytest.raises(RuntimeError, match="snapshot_reference"):
        policy.reference_params()
    x, t, cond = _inputs(policy)
    with torch.no_grad():
        initial = policy.predict(x, t, cond, 4.0)
    policy.snapshot_reference(device="cpu")
    perturb_trainable(policy, seed=3)  # "training"
    out = policy.predict(x, t, cond, 4.0, params=policy.reference_params())
    assert not out.requires_grad
    with torch.no_grad():
        assert torch.equal(out, initial)
        assert not torch.equal(policy.predict(x, t, cond, 4.0), initial)


def test_predict_x0_matches_diffusers_ddim_and_is_differentiable(tiny_sd_path):
    from diffusers import DDIMScheduler

    policy = _sd(tiny_sd_path)
    x, t, cond = _inputs(policy, guidance=False)
    x0 = policy.predict_x0(x, t, cond)
    with torch.no_grad():
        eps = policy.predict(x, t, cond, 1.0)
    # predict_x0 never clips (clipping would stop gradients); compare with diffusers' unclipped estimate.
    scheduler = DDIMScheduler.from_config(policy.schedule.scheduler.config, clip_sample=False)
    scheduler.set_timesteps(10)
    for i in range(2):
        ref = scheduler.step(eps[i:i + 1], int(t[i]), x[i:i + 1]).pred_original_sample
        torch.testing.assert_close(x0[i:i + 1].detach(), ref, rtol=1e-5, atol=1e-5)
    x0.mean().backward()
    assert all(p.grad is not None for p in policy.trainable_parameters())


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_noise_to_and_x0_from_the_true_target_recover_x0(tiny_ddpm_path, kind):
    """``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``; the ideal model output maps back to ``x0`` exactly."""
    from diffrl.pipelines import DenoisingSchedule

    policy = DDPMPolicy.from_pretrained(tiny_ddpm_path)
    g = torch.Generator().manual_seed(0)
    x0, eps, t = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g), torch.tensor([1, 500, 999])
    abar = policy.schedule.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = policy.noise_to(x0, eps, t)
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    schedule = DenoisingSchedule.from_scheduler_config({**policy.schedule.scheduler.config, "prediction_type": kind})
    x_t2, target = schedule.training_pair(x0, eps, t)
    torch.testing.assert_close(schedule.x0_from_output(target, x_t2, t), x0, rtol=1e-4, atol=1e-4)


def test_text_conditioning_concat_index_and_without_guidance():
    a = TextConditioning(torch.zeros(2, 3, 4), torch.ones(2, 3, 4))
    b = TextConditioning(torch.full((1, 3, 4), 2.0), torch.full((1, 3, 4), 3.0))
    both = TextConditioning.concat([a, b])
    assert both.prompt_embeds.shape == (3, 3, 4) and both.negative_prompt_embeds[2, 0, 0] == 3.0
    assert torch.equal(both.index(slice(2, 3)).prompt_embeds, b.prompt_embeds)
    plain = both.without_guidance()
    assert plain.negative_prompt_embeds is None and plain.prompt_embeds is both.prompt_embeds
    assert TextConditioning.concat([a.without_guidance(), b.without_guidance()]).negative_prompt_embeds is None
    with pytest.raises(ValueError, match="with and without negative_prompt_embeds"):
        TextConditioning.concat([a, b.without_guidance()])
