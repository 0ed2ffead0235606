"""Resuming with changed settings: refused with the reason, or applied."""

from __future__ import annotations

import dataclasses

import pytest

from diffrl.config import AlignPropConfig, ConfigError, DDPOConfig, diff_for_resume, load_config
from diffrl.config import registry
from diffrl.config._base import UNKNOWN_RESUME, resume_rule


def test_changes_are_classified() -> None:
    old = DDPOConfig(train_learning_rate=1e-3, num_epochs=10, resume_from="")
    new = dataclasses.replace(old, train_learning_rate=0.5, num_epochs=20, resume_from="logs/run", seed=3,
                              train_batch_size=2, sample_batch_size=2, train_lora=False)
    diff = diff_for_resume(old, new)
    assert {c.field: (c.old, c.new) for c in diff.applied} == {"train_learning_rate": (1e-3, 0.5),
                                                               "num_epochs": (10, 20)}
    assert {c.field for c in diff.refused} == {"seed", "train_batch_size", "sample_batch_size", "train_lora"}
    with pytest.raises(ConfigError) as err:
        diff.raise_if_refused("logs/run/checkpoints/checkpoint_3")
    text = str(err.value)
    assert "seed=3: differs from logs/run/checkpoints/checkpoint_3's run (0); it cannot change mid-run" in text
    assert "keep seed=0 to resume" in text
    assert diff_for_resume(old, old) == ([], [])


def test_trainer_change_and_unknown_fields_are_refused() -> None:
    diff = diff_for_resume(DDPOConfig(), AlignPropConfig())
    assert [c.field for c in diff.refused] == ["trainer"] and not diff.applied


@pytest.mark.parametrize("trainer", list(registry.TRAINERS))
def test_every_field_states_its_resume_rule_beside_it(trainer) -> None:
    config_cls = registry.config_class(trainer)
    unstated = [f.name for f in dataclasses.fields(config_cls) if resume_rule(config_cls, f.name) == UNKNOWN_RESUME]
    assert unstated == []
    # the rule travels with the field: a redeclared default keeps its own rule (NFT's learning rate applies)
    assert resume_rule(config_cls, "train_learning_rate") == "apply"
    assert "weights" in resume_rule(config_cls, "lora_rank")


def test_old_records_move_sdxl_fields_into_model_options_and_drop_what_grpo_no_longer_has(tmp_path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("trainer: grpo\nsdxl_original_size: [64, 48]\nsdxl_target_size: null\n"
                    "sdxl_crops_coords_top_left: [0, 0]\ntrain_timestep_fraction: 1.0\ncompile_unet: false\n"
                    "per_prompt_stat_tracking: false\n")
    recorded = load_config(path, recorded=True)
    assert recorded.model_options == {"original_size": [64, 48]}
    assert not hasattr(recorded, "train_timestep_fraction") and not hasattr(recorded, "compile_model")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "sdxl_original_size=[64, 48]: was renamed to model_options.original_size" in text
    assert "write model_options: {original_size: [64, 48]}" in text
    assert "train_timestep_fraction=1.0: unknown field of GRPOConfig: GRPO trains the steps of its window" in text


def test_recorded_redacted_values_are_not_a_difference(tmp_path) -> None:
    run = DDPOConfig(reward_options={"token": "abc", "digit": 3})
    run.to_yaml(tmp_path / "config.yaml")
    recorded = load_config(tmp_path / "config.yaml", recorded=True)
    assert recorded.reward_options == {"token": "***", "digit": 3}
    assert diff_for_resume(recorded, run) == ([], [])
    changed = dataclasses.replace(run, reward_options={"token": "abc", "digit": 4})
    assert [c.field for c in diff_for_resume(recorded, changed).refused] == ["reward_options"]


def test_old_records_load_and_old_user_files_name_the_new_field(tmp_path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("trainer: ddpo\nuse_lora: false\n")
    assert load_config(path, recorded=True).train_lora is False
    with pytest.raises(ConfigError, match=r"use_lora=False: was renamed to train_lora .*Fix: write train_lora: False"):
        load_config(path)


def test_the_old_keyword_names_the_new_one() -> None:
    with pytest.raises(ConfigError, match=r"use_lora=False: was renamed to train_lora .*train_lora=False"):
        DDPOConfig(use_lora=False)
    assert "use_lora" not in {f.name for f in dataclasses.fields(AlignPropConfig)}
    assert dataclasses.replace(DDPOConfig(), seed=2).seed == 2
