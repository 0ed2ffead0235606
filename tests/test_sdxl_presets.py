"""The SDXL presets: they load and validate for their GPU count, say what they need, and their settings build the
SDXL policy (on the tiny SDXL instead of the Hub model) at the model's native sample size, or at the 512x512
their header offers."""

import dataclasses
from pathlib import Path

import pytest

from diffrl import build
from diffrl.config import load_config
from diffrl.pipelines import StableDiffusionXLPolicy
from diffrl.testing.sdxl import save_tiny_sdxl

CONFIGS = Path(__file__).parents[1] / "configs"
SDXL_PRESETS = ["sdxl_ddpo_aesthetic", "sdxl_ddpo_compressibility", "sdxl_ddpo_pickscore", "sdxl_alignprop_aesthetic"]


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return str(save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl")))


@pytest.mark.parametrize("name", SDXL_PRESETS)
def test_sdxl_preset_loads_validates_and_states_its_needs(name):
    path = CONFIGS / f"{name}.yaml"
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0] == (f"# Run: accelerate launch --num_processes 8 -m diffrl.cli train configs/{name}.yaml")
    config = load_config(path)
    config.validate(num_processes=8, check_environment=False)
    assert config.model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert config.mixed_precision == "bf16" and config.train_lora is True
    assert config.exp_name == name
    assert "GPU memory: not measured: no GPU was lent to this session (2026-12-01)" in text
    assert "1024x1024" in text and "512x512" in text
    assert config.gradient_checkpointing is True
    assert config.sample_height is None and config.sample_width is None  # native 1024x1024
    assert "`sample_height=512 sample_width=512`" in text
    smaller = config.with_overrides(["sample_height=512", "sample_width=512"])
    smaller.validate(num_processes=8, check_environment=False)
    assert (smaller.sample_height, smaller.sample_width) == (512, 512)
    # The comments are one header: no setting is commented out (it would escape validation).
    first_setting = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    assert not any(line.lstrip().startswith("#") for line in lines[first_setting:])


def test_sdxl_ddpo_presets_state_their_batch_arithmetic():
    for name in SDXL_PRESETS[:3]:
        config = load_config(CONFIGS / f"{name}.yaml")
        per_step = config.train_batch_size * 8 * config.train_gradient_accumulation_steps
        stated = f"On 8 GPUs: 8 x {config.sample_batch_size} x {config.sample_num_batches_per_epoch} = " \
                 f"{config.samples_per_epoch(8)} samples per epoch, {per_step} per optimizer step."
        assert stated in (CONFIGS / f"{name}.yaml").read_text()
    config = load_config(CONFIGS / "sdxl_alignprop_aesthetic.yaml")
    assert f"8 x {config.train_batch_size} x {config.train_gradient_accumulation_steps} = " \
           f"{8 * config.train_batch_size * config.train_gradient_accumulation_steps} samples per optimizer step" \
        in (CONFIGS / "sdxl_alignprop_aesthetic.yaml").read_text()


@pytest.mark.parametrize("name", ["sdxl_ddpo_compressibility", "sdxl_alignprop_aesthetic"])
def test_sdxl_preset_settings_build_the_sdxl_policy(name, tiny_sdxl):
    config = dataclasses.replace(load_config(CONFIGS / f"{name}.yaml"), model=tiny_sdxl)
    policy = build.build_policy(config, mixed_precision="no")
    assert isinstance(policy, StableDiffusionXLPolicy) and policy.use_lora
    assert policy.lora.rank == config.lora_rank and policy.lora.target_modules == tuple(config.lora_target_modules)
    # The native size: the UNet's sample_size x the VAE factor (128 x 8 = 1024 for SDXL base; 8 x 2 = 16 here).
    assert policy.image_size() == (16, 16)
    assert policy.add_time_ids(1).tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]


def test_sdxl_preset_at_a_smaller_size_samples_it_with_matching_add_time_ids(tiny_sdxl):
    # The header's override on the tiny SDXL: half its native 16x16, as 512 is half of SDXL base's 1024.
    config = load_config(CONFIGS / "sdxl_ddpo_aesthetic.yaml").with_overrides(
        [f"model={tiny_sdxl}", "sample_height=8", "sample_width=8"])
    config.validate(num_processes=8, check_environment=False)
    policy = build.build_policy(config, mixed_precision="no")
    build.apply_gradient_checkpointing(policy, config)  # what the trainer does with the preset's setting
    assert policy.trainable_module.is_gradient_checkpointing
    out = policy.sample(["a cat"], num_inference_steps=2, guidance_scale=config.sample_guidance_scale,
                        height=config.sample_height, width=config.sample_width)
    assert out.trajectory.images.shape == (1, 3, 8, 8)
    assert out.trajectory.conditioning.add_time_ids.tolist() == [[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]]
