"""The config's sample size, separate VAE, SDXL size conditioning and gradient checkpointing, from the config to
the trainers' samples, the rebuilt checkpoints and ``diffrl sample``; and the one-line errors for what a model
cannot take."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffrl import AlignPropTrainer, DDPOTrainer, GRPOTrainer, NFTTrainer, build
from diffrl.cli import main
from diffrl.config import AlignPropConfig, ConfigError, DDPOConfig, GRPOConfig, NFTConfig
from diffrl.config.resume import diff_for_resume
from diffrl.evaluate.loading import load_model
from diffrl.testing.models import build_tiny_stable_diffusion
from diffrl.testing.sdxl import save_tiny_sdxl_vae


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


def cat():
    return "a cat", {}


@pytest.fixture(scope="module")
def fp16_safe_vae(tmp_path_factory):
    return str(save_tiny_sdxl_vae(tmp_path_factory.mktemp("sdxl-vae")))


def _config(tmp_path, model, **kw):
    base = dict(model=model, num_epochs=1, sample_num_steps=3, sample_batch_size=2, sample_num_batches_per_epoch=1,
                train_batch_size=2, mixed_precision="no", logdir=str(tmp_path / "logs"), run_name="run",
                train_learning_rate=3e-3, train_clip_range=0.2, sample_guidance_scale=3.0, seed=1)
    base.update(kw)
    return DDPOConfig(**base).validate(check_environment=False)


def _ratios(policy, traj, guidance_scale):
    """``[B, T]`` exp(log pi_theta - log pi_sample) of every step, recomputed under the current weights."""
    out = []
    with torch.no_grad():
        for j in range(traj.timesteps.shape[1]):
            step = policy.step_log_prob(traj.latents[:, j], traj.timesteps[:, j], traj.prev_timesteps[:, j],
                                        traj.latents[:, j + 1], traj.conditioning, eta=1.0,
                                        guidance_scale=guidance_scale)
            out.append(torch.exp(step.log_prob - traj.log_probs[:, j]))
    return torch.stack(out, 1)


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_ddpo_at_twice_the_native_size_samples_that_size_with_ratio_one(model, tiny_sd_path, tiny_sdxl_path,
                                                                        tmp_path):
    path = tiny_sd_path if model == "sd" else tiny_sdxl_path  # both 16x16 natively
    config = _config(tmp_path, path, sample_height=32, sample_width=24)
    policy = build.build_policy(config)
    shapes = []
    trainer = DDPOTrainer(config, brightness, cat, policy,
                          image_samples_hook=lambda data, step, tracker: shapes.extend(d[0].shape for d in data))
    trainer.train()
    assert shapes == [torch.Size([2, 3, 32, 24])]
    metrics = [json.loads(line) for line in (tmp_path / "logs" / "run" / "metrics.jsonl").read_text().splitlines()]
    # One optimizer step per epoch: every ratio of the epoch is computed before the update, so it is exactly 1.
    assert metrics[-1]["stats/ratio"] == pytest.approx(1.0, abs=1e-5) and metrics[-1]["stats/clipfrac"] == 0
    traj = policy.sample(["a cat", "a dog"], num_inference_steps=3, guidance_scale=3.0, eta=1.0,
                         height=config.sample_height, width=config.sample_width,
                         generator=torch.Generator().manual_seed(0)).trajectory
    factor = policy.vae_scale_factor  # 2 for the tiny models (8 for SD and SDXL)
    assert traj.latents.shape[-2:] == (32 // factor, 24 // factor) and traj.images.shape[-2:] == (32, 24)
    assert (_ratios(policy, traj, 3.0) - 1).abs().max() < 1e-5
    if model == "sdxl":  # add_time_ids follow the sampled size
        assert traj.conditioning.add_time_ids[0].tolist() == [32.0, 24.0, 0.0, 0.0, 32.0, 24.0]


OTHER_TRAINERS = {
    "grpo": (GRPOTrainer, GRPOConfig, dict(prompts_per_epoch=1, group_size=2, sample_batch_size=2, train_batch_size=2)),
    "nft": (NFTTrainer, NFTConfig, dict(sample_batch_size=2, sample_num_batches_per_epoch=1, train_batch_size=2,
                                        group_size=2)),
    "alignprop": (AlignPropTrainer, AlignPropConfig, dict(train_batch_size=2, truncated_rand_backprop_minmax=(0, 2))),
}


@pytest.mark.parametrize("name", list(OTHER_TRAINERS))
def test_grpo_nft_alignprop_and_evaluation_sample_at_the_configured_size(name, tiny_sdxl_path, tmp_path):
    trainer_cls, config_cls, extra = OTHER_TRAINERS[name]
    config = config_cls(model=tiny_sdxl_path, num_epochs=1, sample_num_steps=2, mixed_precision="no", seed=1,
                        logdir=str(tmp_path / "logs"), run_name="run", sample_guidance_scale=2.0, sample_height=24,
                        sample_width=32, eval_every=1, eval_num_samples=2, **extra).validate(check_environment=False)
    shapes = []

    def reward(images, prompts, metadata):
        shapes.append(tuple(images.shape[-2:]))
        return images.mean(dim=(1, 2, 3)), {}

    trainer_cls(config, reward, cat, build.build_policy(config)).train()
    assert shapes and set(shapes) == {(24, 32)}  # training batches and the fixed-seed evaluation
    metrics = json.loads((tmp_path / "logs" / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "eval/reward_mean" in metrics


def test_a_new_size_vae_or_size_conditioning_is_refused_on_resume():
    old = DDPOConfig()
    new = DDPOConfig(sample_height=512, vae="madebyollin/sdxl-vae-fp16-fix",
                     model_options={"target_size": [512, 512]}, gradient_checkpointing=True)
    diff = diff_for_resume(old, new)
    assert {c.field for c in diff.refused} == {"sample_height", "vae", "model_options"}
    assert [c.field for c in diff.applied] == ["gradient_checkpointing"]


@pytest.mark.parametrize("value", [30, 4, 0])
def test_a_size_off_the_vae_grid_is_one_violation_naming_the_field(value):
    with pytest.raises(ConfigError) as err:
        DDPOConfig(sample_width=value).validate(check_environment=False)
    (violation,) = err.value.violations
    assert violation.field == "sample_width" and "multiple of 8" in violation.problem
    assert "\n" not in str(violation) and "sample_width=" in violation.fix


def test_a_sample_size_on_a_ddpm_is_a_one_line_error_of_diffrl_train(tiny_ddpm_path, tmp_path, capsys):
    assert main(["train", f"model={tiny_ddpm_path}", "reward=jpeg_compressibility", "sample_height=16",
                 "mixed_precision=no", f"logdir={tmp_path / 'logs'}", "num_epochs=1"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffrl")]  # no progress bars
    assert len(lines) == 1
    assert lines[0].startswith("diffrl train: error: sample_height=16: cannot be set: ")
    assert "unconditional pixel-space DDPM" in lines[0] and "fixed" in lines[0]
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("*.safetensors"))


def test_settings_a_model_cannot_take_are_refused_when_it_is_built(tiny_sd_path, tiny_ddpm_path, tmp_path):
    with pytest.raises(ConfigError) as err:
        build.build_policy(_config(tmp_path, tiny_sd_path, model_options={"original_size": [32, 32],
                                                                          "crops_coords_top_left": [0, 4]}))
    assert [v.field for v in err.value.violations] == ["model_options.original_size",
                                                       "model_options.crops_coords_top_left"]
    assert "is not an option of model=" in err.value.violations[0].problem
    assert "(it takes none)" in err.value.violations[0].problem
    with pytest.raises(ConfigError) as err:
        build.build_policy(_config(tmp_path, tiny_ddpm_path, vae="some/vae", sample_width=16))
    assert {v.field for v in err.value.violations} == {"vae", "sample_width"}


def test_diffrl_train_refuses_sdxl_conditioning_on_sd_before_any_weights_load(tiny_sd_path, tmp_path, capsys,
                                                                              monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model's weights were loaded before the kind check")

    monkeypatch.setattr(build, "load_policy", no_loading)
    assert main(["train", f"model={tiny_sd_path}", "reward=jpeg_compressibility", "prompts=simple_animals",
                 "model_options.target_size=[512, 512]", "mixed_precision=no", f"logdir={tmp_path / 'logs'}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffrl")]
    assert len(lines) == 1 and lines[0].startswith("diffrl train: error: model_options.target_size=")
    assert "is not an option of model=" in lines[0] and "a Stable Diffusion model" in lines[0]


def test_sdxl_checks_its_own_options_before_any_weights_load(tiny_sdxl_path, tmp_path):
    config = _config(tmp_path, tiny_sdxl_path, model_options={"orginal_size": [64, 48], "target_size": [0, 24],
                                                              "crops_coords_top_left": [4, -2]})
    with pytest.raises(ConfigError) as err:
        build.check_model_settings(config)
    by_field = {v.field: v for v in err.value.violations}
    assert list(by_field) == ["model_options.orginal_size", "model_options.target_size",
                              "model_options.crops_coords_top_left"]
    assert by_field["model_options.orginal_size"].fix == "did you mean 'original_size'?"
    assert "two positive sizes" in by_field["model_options.target_size"].problem
    assert "offsets >= 0" in by_field["model_options.crops_coords_top_left"].problem


def test_sdxl_size_conditioning_reaches_the_unets_add_time_ids(tiny_sdxl_path, tmp_path):
    config = _config(tmp_path, tiny_sdxl_path, sample_width=24, model_options={
        "original_size": [64, 48], "target_size": [16, 24], "crops_coords_top_left": [4, 2]})
    policy = build.build_policy(config)
    seen = []
    hook = policy.trainable_module.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True)
    try:
        traj = policy.sample(["a cat"], num_inference_steps=2, guidance_scale=3.0,
                             height=config.sample_height, width=config.sample_width).trajectory
    finally:
        hook.remove()
    assert traj.images.shape[-2:] == (16, 24)
    assert len(seen) == 2 and all(ids.tolist() == [[64.0, 48.0, 4.0, 2.0, 16.0, 24.0]] * 2 for ids in seen)


def test_the_vae_field_loads_a_separate_vae_and_checkpoints_rebuild_with_it(tiny_sdxl_path, fp16_safe_vae, tmp_path):
    config = _config(tmp_path, tiny_sdxl_path, vae=fp16_safe_vae, model_options={"original_size": [40, 40]},
                     save_freq=1, sample_height=24)
    policy = build.build_policy(config)
    vae = policy.pipeline.vae
    assert vae.config.force_upcast is False  # the stand-in for an fp16-safe VAE, not the model's own
    saved = load_file(f"{fp16_safe_vae}/diffusion_pytorch_model.safetensors")
    for name, value in vae.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)
    DDPOTrainer(config, brightness, cat, policy).train()
    checkpoint = next((tmp_path / "logs" / "run" / "checkpoints").iterdir())
    loaded = load_model(str(checkpoint))
    assert loaded.policy.pipeline.vae.config.force_upcast is False and loaded.policy.original_size == (40, 40)
    assert (loaded.info["sample_height"], loaded.info["sample_width"]) == (24, None)
    for name, value in loaded.policy.trainable_state_dict().items():
        torch.testing.assert_close(value, policy.trainable_state_dict()[name])
    policy.save_pretrained(tmp_path / "result")
    final = json.loads((tmp_path / "result" / "diffrl_model.json").read_text())
    assert final["vae"] == fp16_safe_vae and final["sdxl"]["original_size"] == [40, 40]
    # a result written before the VAE moved out of the "sdxl" record still loads its VAE
    final["sdxl"]["vae"] = final.pop("vae")
    (tmp_path / "result" / "diffrl_model.json").write_text(json.dumps(final))
    assert build.load_policy(str(tmp_path / "result")).pipeline.vae.config.force_upcast is False


def test_the_vae_field_replaces_a_stable_diffusion_vae(tiny_sd_path, tmp_path):
    other = tmp_path / "sd-vae"
    build_tiny_stable_diffusion(seed=7).vae.save_pretrained(other)
    policy = build.build_policy(_config(tmp_path, tiny_sd_path, vae=str(other)))
    saved = load_file(other / "diffusion_pytorch_model.safetensors")
    for name, value in policy.pipeline.vae.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)
    # a LoRA result records the VAE and loads it again, as an SDXL one does
    policy.save_pretrained(tmp_path / "result")
    assert json.loads((tmp_path / "result" / "diffrl_model.json").read_text())["vae"] == str(other)
    reloaded = build.load_policy(str(tmp_path / "result"))
    assert reloaded.vae_source == str(other)
    for name, value in reloaded.pipeline.vae.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)


def _block_calls_in_backward(policy):
    """How often the UNet's last resnet (a checkpointed unit of diffusers' blocks, after the LoRA attention layers,
    so the backward pass goes through it) runs for one forward and backward of a training step."""
    calls = []
    block = policy.trainable_module.up_blocks[-1].resnets[-1]
    # A pre-hook: the recomputation stops once it has what the backward pass needs, before any forward hook.
    hook = block.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        traj = policy.sample(["a cat"], num_inference_steps=2, guidance_scale=1.0,
                             generator=torch.Generator().manual_seed(0)).trajectory
        calls.clear()
        step = policy.step_log_prob(traj.latents[:, 0], traj.timesteps[:, 0], traj.prev_timesteps[:, 0],
                                    traj.latents[:, 1], traj.conditioning, eta=1.0, guidance_scale=1.0)
        step.log_prob.sum().backward()
    finally:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in policy.trainable_module.named_parameters() if p.grad is not None}
    return len(calls), grads


def test_gradient_checkpointing_recomputes_the_unet_blocks_with_the_same_gradients(tiny_sd_path, tmp_path):
    torch.manual_seed(0)
    plain = build.build_policy(_config(tmp_path, tiny_sd_path))
    torch.manual_seed(0)
    checkpointed = build.build_policy(_config(tmp_path, tiny_sd_path, gradient_checkpointing=True))
    build.apply_gradient_checkpointing(checkpointed, _config(tmp_path, tiny_sd_path, gradient_checkpointing=True))
    assert checkpointed.trainable_module.is_gradient_checkpointing
    assert not plain.trainable_module.is_gradient_checkpointing
    calls_plain, grads_plain = _block_calls_in_backward(plain)
    calls_ckpt, grads_ckpt = _block_calls_in_backward(checkpointed)
    assert calls_plain == 1 and calls_ckpt == 2  # the backward pass ran the resnet again
    assert grads_plain.keys() == grads_ckpt.keys() and grads_plain
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-5, atol=1e-7)
    # AlignProp checkpoints each UNet call of its chain itself: its UNet is left as is.
    align = AlignPropConfig(model=tiny_sd_path, mixed_precision="no", gradient_checkpointing=True)
    policy = build.build_policy(align)
    build.apply_gradient_checkpointing(policy, align)
    assert not policy.trainable_module.is_gradient_checkpointing


def test_the_trainer_turns_on_gradient_checkpointing_for_a_policy_built_outside_diffrl_train(tiny_sd_path, tmp_path):
    from diffrl import DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    pipe = DefaultDDPOStableDiffusionPipeline(tiny_sd_path)  # TRL-style: not through build_policy
    config = DDPOConfig(num_epochs=1, sample_num_steps=2, sample_batch_size=2, sample_num_batches_per_epoch=1,
                        train_batch_size=1, mixed_precision="no", logdir=str(tmp_path / "logs"),
                        gradient_checkpointing=True)
    trainer = DDPOTrainer(config, lambda im, p, m: (im.mean(dim=(1, 2, 3)), {}), lambda: ("a cat", {}), pipe)
    assert trainer.policy.trainable_module.is_gradient_checkpointing


def test_diffrl_sample_takes_height_and_width(tiny_sd_path, tiny_ddpm_path, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(["sample", tiny_sd_path, "--prompts", "a cat", "--seeds", "0", "--steps", "2", "--height", "24",
                 "--width", "40", "--out", str(out)]) == 0
    assert Image.open(out / "p000_s0.png").size == (40, 24)  # PIL: (width, height)
    settings = json.loads((out / "index.json").read_text())["settings"]
    assert (settings["height"], settings["width"]) == (24, 40)
    capsys.readouterr()
    # The tiny model's VAE factor is 2 (SD's and SDXL's is 8): the check is the loaded model's own factor.
    assert main(["sample", tiny_sd_path, "--prompts", "a cat", "--seeds", "0", "--steps", "2", "--height", "21",
                 "--out", str(tmp_path / "bad")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffrl")]
    assert len(err) == 1 and "--height=21 is not a multiple of 2" in err[0] and "--height 22" in err[0]
    assert main(["sample", tiny_ddpm_path, "--seeds", "0", "--steps", "2", "--width", "16",
                 "--out", str(tmp_path / "ddpm")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffrl")]
    assert len(err) == 1 and "unconditional DDPM" in err[0] and "--width=16" in err[0]
