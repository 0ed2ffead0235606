"""The flow-model presets (SD3.5 Medium with Flow-GRPO and DiffusionNFT settings, FLUX.1-dev LoRA GRPO): they load
and validate for their GPU count, state what they need, and their settings pass the family's checks and build its
policy (on the tiny SD3 / FLUX instead of the Hub model)."""

from pathlib import Path

import pytest

from diffrl import build
from diffrl.config import load_config

CONFIGS = Path(__file__).parents[1] / "configs"
PRESETS = {"sd35m_grpo_pickscore": "sd3", "sd35m_nft_pickscore": "sd3", "flux_dev_grpo_pickscore": "flux"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_flow_preset_loads_validates_and_states_its_needs(name):
    path = CONFIGS / f"{name}.yaml"
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0] == f"# Run: accelerate launch --num_processes 8 -m diffrl.cli train configs/{name}.yaml"
    config = load_config(path)
    config.validate(num_processes=8, check_environment=False)
    assert config.exp_name == name and config.mixed_precision == "bf16" and config.train_lora
    assert (config.lora_rank, config.lora_alpha) == (32, 64)
    assert "GPU memory: not measured: no GPU was lent to this session (2026-12-06)" in text
    assert f"{config.samples_per_epoch(8)} samples per epoch" in text
    first_setting = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    assert not any(line.lstrip().startswith("#") for line in lines[first_setting:])


def test_the_flow_grpo_preset_has_the_papers_settings():
    c = load_config(CONFIGS / "sd35m_grpo_pickscore.yaml")
    assert (c.group_size, c.sample_num_steps, c.eval_num_steps, c.sample_eta) == (24, 10, 40, 0.7)
    assert (c.kl_coef, c.sample_guidance_scale, c.train_learning_rate) == (0.01, 4.5, 3e-4)
    assert c.sample_batch_size == c.train_batch_size  # Flow-GRPO's FAQ


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_flow_preset_settings_build_the_familys_policy(name, tiny_sd3_path, tiny_flux_path):
    model = tiny_sd3_path if PRESETS[name] == "sd3" else tiny_flux_path
    config = load_config(CONFIGS / name.__add__(".yaml"), [f"model={model}"])
    build.check_model_settings(config)  # the family's refusals, before any weights load: none
    policy = build.build_policy(config)
    assert policy.kind == PRESETS[name] and policy.lora.alpha == 64
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in policy.trainable_module.named_parameters()
               if "lora_A" in n}
    assert {"add_q_proj", "to_add_out", "to_q"} <= adapted
    if PRESETS[name] == "flux":
        assert policy.guidance == 3.5 and policy.max_sequence_length == 512
