"""The strict config: TRL 0.23's defaults, unknown keys, types, overrides, validation, YAML."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pickle
import sys
from typing import Any, Optional, get_type_hints

import pytest

from diffrl.config import AlignPropConfig, ConfigError, DDPOConfig, load_config, split_prompts

# Written out by hand from seed 000 (TRL 0.23's DDPOConfig signature) -- exp_name is checked apart.
TRL_DDPO_DEFAULTS = {
    "run_name": "", "seed": 0, "log_with": None, "tracker_kwargs": {}, "accelerator_kwargs": {},
    "project_kwargs": {}, "tracker_project_name": "trl", "logdir": "logs", "num_epochs": 100, "save_freq": 1,
    "num_checkpoint_limit": 5, "allow_tf32": True, "resume_from": "",
    "sample_num_steps": 50, "sample_eta": 1.0, "sample_guidance_scale": 5.0, "sample_batch_size": 1,
    "sample_num_batches_per_epoch": 2, "train_batch_size": 1, "train_use_8bit_adam": False,
    "train_learning_rate": 0.0003, "train_adam_beta1": 0.9, "train_adam_beta2": 0.999,
    "train_adam_weight_decay": 0.0001, "train_adam_epsilon": 1e-08, "train_gradient_accumulation_steps": 1,
    "train_max_grad_norm": 1.0, "train_num_inner_epochs": 1, "train_cfg": True, "train_adv_clip_max": 5.0,
    "train_clip_range": 0.0001, "train_timestep_fraction": 1.0, "per_prompt_stat_tracking": False,
    "per_prompt_stat_tracking_buffer_size": 16, "per_prompt_stat_tracking_min_count": 16,
    "async_reward_computation": False, "max_workers": 2, "negative_prompts": "",
    "push_to_hub": False,  # in TRL 0.23's source, though the docs' signature leaves it out
}
TRL_DDPO_TYPES = {
    "exp_name": str, "run_name": str, "seed": int, "log_with": Optional[str], "tracker_kwargs": dict,
    "allow_tf32": bool, "sample_eta": float, "sample_batch_size": int,
    "negative_prompts": str, "train_learning_rate": float, "train_cfg": bool,
}

# Seed 001 and REFERENCE.md (TRL 0.23's AlignPropConfig): the shared fields as DDPO, with these differences.
TRL_ALIGNPROP_DEFAULTS = {
    **{k: v for k, v in TRL_DDPO_DEFAULTS.items() if k not in {
        "sample_batch_size", "sample_num_batches_per_epoch", "train_num_inner_epochs", "train_cfg",
        "train_adv_clip_max", "train_clip_range", "train_timestep_fraction", "per_prompt_stat_tracking",
        "per_prompt_stat_tracking_buffer_size", "per_prompt_stat_tracking_min_count",
        "async_reward_computation", "max_workers"}},
    "train_learning_rate": 1e-3, "negative_prompts": None, "log_image_freq": 1,
    "truncated_backprop_rand": True, "truncated_backprop_timestep": 49, "truncated_rand_backprop_minmax": (0, 50),
}

DIFFRL_DEFAULTS = {
    "model": None, "model_revision": "main", "train_lora": True, "lora_rank": 4, "lora_alpha": 4,
    "lora_target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "reward": None, "reward_options": {},
    "prompts": None, "prompt_options": {}, "lr_scheduler": "constant", "eval_every": 0, "keep_best": False,
}


def problems(err: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    """field -> its violation's text."""
    return {v.field: str(v) for v in err.value.violations}


# ---- defaults, names, types ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "expected"), [(DDPOConfig, TRL_DDPO_DEFAULTS), (AlignPropConfig, TRL_ALIGNPROP_DEFAULTS)]
)
def test_trl_defaults_are_kept(cls: type, expected: dict[str, Any]) -> None:
    config = cls()
    actual = {name: getattr(config, name) for name in expected}
    # The one deliberate difference: runs of a diffrl trainer go to a "diffrl" tracker project, not TRL's "trl".
    assert actual.pop("tracker_project_name") == "diffrl" and expected["tracker_project_name"] == "trl"
    expected = {k: v for k, v in expected.items() if k != "tracker_project_name"}
    assert actual == expected
    assert {type(getattr(config, n)) for n in expected if isinstance(expected[n], float)} == {float}
    assert config.exp_name == os.path.basename(sys.argv[0]).removesuffix(".py")
    assert {n: getattr(config, n) for n in DIFFRL_DEFAULTS} == DIFFRL_DEFAULTS


def test_trl_field_types_and_diffrl_defaults_keep_trl_behaviour() -> None:
    hints = get_type_hints(DDPOConfig)
    assert {n: hints[n] for n in TRL_DDPO_TYPES} == TRL_DDPO_TYPES
    assert get_type_hints(AlignPropConfig)["negative_prompts"] == Optional[str]
    assert get_type_hints(AlignPropConfig)["truncated_rand_backprop_minmax"] == tuple[int, int]
    assert DDPOConfig().algorithm == "ddpo_is"
    assert AlignPropConfig().truncation is None and AlignPropConfig().truncation_strategy == "random"
    assert AlignPropConfig(truncated_backprop_rand=False).truncation_strategy == "fixed"
    assert AlignPropConfig(truncation="refl").truncation_strategy == "refl"


def test_every_field_has_help_and_trl_fields_come_first() -> None:
    for cls, expected in ((DDPOConfig, TRL_DDPO_DEFAULTS), (AlignPropConfig, TRL_ALIGNPROP_DEFAULTS)):
        infos = cls.describe_fields()
        assert all(i.help for i in infos)
        trl = [i.name for i in infos if i.trl]
        assert set(trl) == set(expected) | {"exp_name", "mixed_precision"}
        assert [i.name for i in infos[: len(trl)]] == trl
        assert "train_clip_range" in cls.help_text() or cls is AlignPropConfig


def test_hf_argument_parser_accepts_the_classes() -> None:
    # TRL's example scripts build their CLI with HfArgumentParser((ScriptArguments, DDPOConfig)).
    transformers = pytest.importorskip("transformers")
    (config,) = transformers.HfArgumentParser(AlignPropConfig).parse_args_into_dataclasses(
        ["--train_batch_size", "2", "--truncation", "draft_k", "--lora_target_modules", "to_q", "to_v"]
    )
    assert config.train_batch_size == 2 and config.truncation_strategy == "draft_k"
    assert config.lora_target_modules == ["to_q", "to_v"]


def test_negative_prompts_are_split() -> None:
    assert DDPOConfig(negative_prompts="blurry, low quality,,  watermark ").negative_prompt_list == [
        "blurry", "low quality", "watermark"]
    assert split_prompts(r"a cat\, sleeping, text") == ["a cat, sleeping", "text"]
    assert DDPOConfig().negative_prompt_list == [] and AlignPropConfig().negative_prompt_list == []


# ---- strict loading -------------------------------------------------------------------------------


def test_unknown_key_names_it_and_suggests_the_closest_field() -> None:
    with pytest.raises(ConfigError) as err:
        DDPOConfig.from_dict({"sample_batchsize": 4, "train_lerning_rate": 1e-4})
    found = problems(err)
    assert "did you mean 'sample_batch_size'" in found["sample_batchsize"]
    assert "did you mean 'train_learning_rate'" in found["train_lerning_rate"]
    with pytest.raises(ConfigError, match=r"sample_batch_size=2: unknown field of AlignPropConfig \(a field of DDPO"):
        AlignPropConfig.from_dict({"sample_batch_size": 2})


def test_wrong_types_name_field_value_and_expected_type() -> None:
    with pytest.raises(ConfigError) as err:
        DDPOConfig.from_dict({"train_batch_size": "3", "train_cfg": 1, "sample_num_steps": 50.0,
                              "truncated_rand_backprop_minmax": [0, 50]})
    found = problems(err)
    assert found["train_batch_size"].startswith("train_batch_size='3': expected int, got str")
    assert "without quotes" in found["train_batch_size"]
    assert "expected bool, got int" in found["train_cfg"]
    assert "expected int, got float" in found["sample_num_steps"]
    assert "unknown field" in found["truncated_rand_backprop_minmax"]
    with pytest.raises(ConfigError, match="algorithm"):
        DDPOConfig.from_dict({"algorithm": "ppo"})


def test_lossless_coercions_only() -> None:
    config = AlignPropConfig.from_dict({"train_learning_rate": 1, "truncated_rand_backprop_minmax": [2, 40]})
    assert config.train_learning_rate == 1.0 and isinstance(config.train_learning_rate, float)
    assert config.truncated_rand_backprop_minmax == (2, 40)
    with pytest.raises(ConfigError, match="expected a list of 2 values"):
        AlignPropConfig.from_dict({"truncated_rand_backprop_minmax": [1, 2, 3]})
    with pytest.raises(ConfigError, match=r"DDPOConfig: 1 problem:\n  - train_batch_size='3'"):
        DDPOConfig(train_batch_size="3")  # direct construction is strict too


def test_yaml_uses_the_1_2_schema_and_rejects_duplicate_keys(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train_clip_range: 1e-4\nmixed_precision: no\nlogdir: on\nnum_epochs: 010\n")
    config = DDPOConfig.from_yaml(path)
    assert (config.train_clip_range, config.mixed_precision, config.logdir, config.num_epochs) == (1e-4, "no", "on", 10)
    path.write_text("seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match="duplicate key 'seed'"):
        DDPOConfig.from_yaml(path)
    path.write_text("train_cfg: yes\n")
    with pytest.raises(ConfigError, match="train_cfg='yes': expected bool"):
        DDPOConfig.from_yaml(path)


def test_overrides_parse_values_as_yaml() -> None:
    config = AlignPropConfig().with_overrides([
        "truncated_rand_backprop_minmax=[0,30]", "train_batch_size=4", "train_learning_rate=1e-5",
        "negative_prompts=blurry, ugly", "run_name=2024", "reward_options.digit=7", "reward_options.log=true",
        "lora_target_modules=[to_q, to_v]", "model=null", "mixed_precision=no",
    ])
    assert config.truncated_rand_backprop_minmax == (0, 30)
    assert (config.train_batch_size, config.train_learning_rate) == (4, 1e-5)
    assert config.negative_prompt_list == ["blurry", "ugly"]
    assert config.run_name == "2024"  # text field: the raw text, not the int YAML would make of it
    assert config.reward_options == {"digit": 7, "log": True}
    assert config.lora_target_modules == ["to_q", "to_v"]
    assert config.model is None and config.mixed_precision == "no"
    assert DDPOConfig().with_overrides(["negative_prompts="]).negative_prompts == ""


def test_bad_overrides_are_all_reported() -> None:
    with pytest.raises(ConfigError) as err:
        AlignPropConfig().with_overrides(["train_batch_size=four", "truncated_rand_backprop_minmax=(0,30)",
                                          "sample_eta", "trian_batch_size=2"])
    found = problems(err)
    assert "expected int, got str" in found["train_batch_size"]
    assert "YAML list" in found["truncated_rand_backprop_minmax"]
    assert "field=value" in found["sample_eta"]
    assert "did you mean 'train_batch_size'" in found["trian_batch_size"]


# ---- validation -----------------------------------------------------------------------------------


def test_config_error_pickles_with_its_violations() -> None:
    with pytest.raises(ConfigError) as err:
        DDPOConfig(sample_batch_size=2, train_batch_size=4).validate()
    copy = pickle.loads(pickle.dumps(err.value))
    assert copy.violations == err.value.violations and str(copy) == str(err.value)


def test_defaults_validate() -> None:
    assert DDPOConfig().validate() is not None
    AlignPropConfig().validate(num_processes=8)
    DDPOConfig(sample_batch_size=8, train_batch_size=4, sample_num_batches_per_epoch=4,
               train_gradient_accumulation_steps=2).validate(num_processes=8)  # the paper's preset


def test_rule_sample_batch_at_least_train_batch() -> None:
    with pytest.raises(ConfigError) as err:
        DDPOConfig(sample_batch_size=2, train_batch_size=4).validate()
    text = problems(err)["sample_batch_size"]
    assert text.startswith("sample_batch_size=2: must be >= train_batch_size=4")
    assert "set sample_batch_size=4" in text


def test_rule_sample_batch_divisible_by_train_batch() -> None:
    with pytest.raises(ConfigError) as err:
        DDPOConfig(sample_batch_size=6, train_batch_size=4).validate()
    text = problems(err)["sample_batch_size"]
    assert text.startswith("sample_batch_size=6: must be divisible by train_batch_size=4")
    assert "sample_batch_size=8" in text and "train_batch_size=3" in text


def test_rule_epoch_samples_divisible_by_optimizer_step() -> None:
    config = DDPOConfig(sample_batch_size=4, train_batch_size=2, sample_num_batches_per_epoch=3,
                        train_gradient_accumulation_steps=4)
    with pytest.raises(ConfigError) as err:
        config.validate(num_processes=2)
    text = problems(err)["sample_num_batches_per_epoch"]
    assert text.startswith("sample_num_batches_per_epoch=3: gives 24 samples per epoch")
    assert "2 processes" in text and "16 samples of one optimizer step" in text
    assert "set sample_num_batches_per_epoch=4" in text
    assert "train_gradient_accumulation_steps=3" in text  # 24 % (2 * 2 * 3) == 0
    dataclasses.replace(config, sample_num_batches_per_epoch=4).validate(num_processes=2)


def test_all_violations_are_reported_together() -> None:
    config = DDPOConfig(sample_batch_size=3, train_batch_size=2, train_timestep_fraction=0.0, sample_eta=0.0,
                        train_clip_range=0.0, mixed_precision="none", log_with="tensorboardd", num_epochs=0,
                        per_prompt_stat_tracking=True, per_prompt_stat_tracking_min_count=32,
                        train_learning_rate=math.nan, run_name="a/b")
    with pytest.raises(ConfigError) as err:
        config.validate(check_environment=False)
    found = problems(err)
    assert set(found) == {"sample_batch_size", "train_timestep_fraction",
                          "sample_eta", "train_clip_range", "mixed_precision", "log_with", "num_epochs",
                          "per_prompt_stat_tracking_min_count", "train_learning_rate", "run_name"}
    assert "train_timestep_fraction=0.0: must be in (0.0, 1.0]" in found["train_timestep_fraction"]
    assert "log-probability" in found["sample_eta"] and "algorithm=rwr" in found["sample_eta"]
    assert "use 'no'" in found["mixed_precision"]
    assert "did you mean 'tensorboard'" in found["log_with"]
    assert str(err.value).startswith("DDPOConfig is invalid: 10 problems:\n  - ")


def test_ranges_and_algorithm_rules() -> None:
    DDPOConfig(algorithm="rwr", sample_eta=0.0).validate()  # RWR needs no log-probability
    for kwargs, field in [
        ({"sample_eta": 1.5}, "sample_eta"),
        ({"train_timestep_fraction": 1.5}, "train_timestep_fraction"),
        ({"train_timestep_fraction": 0.01}, "train_timestep_fraction"),  # int(50 * 0.01) == 0 steps
        ({"algorithm": "ddpo_sf", "train_num_inner_epochs": 2}, "train_num_inner_epochs"),
        ({"rwr_temperature": 0.5}, "rwr_temperature"),  # has no effect with ddpo_is
        ({"algorithm": "rwr_sparse", "rwr_sparse_percentile": 100.0}, "rwr_sparse_percentile"),
        ({"lr_scheduler": "warmup_cosine", "lr_initial": 1.0}, "lr_initial"),
        ({"lr_warmup_fraction": 0.1}, "lr_warmup_fraction"),  # constant schedule: no effect
        ({"lr_warmup_steps": 10}, "lr_warmup_steps"),
        ({"lr_scheduler": "linear", "lr_warmup_steps": 10, "lr_warmup_fraction": 0.1}, "lr_warmup_fraction"),
        ({"lr_scheduler": "cosine", "lr_initial": 1e-6}, "lr_initial"),  # warmup_cosine only
        ({"lr_power": 2.0}, "lr_power"),
        ({"keep_best": True}, "keep_best"),
        ({"train_lora": False, "lora_rank": 8}, "lora_rank"),
        ({"train_adam_beta2": 1.0}, "train_adam_beta2"),
    ]:
        with pytest.raises(ConfigError) as err:
            DDPOConfig(**kwargs).validate()
        assert set(problems(err)) == {field}, kwargs
    DDPOConfig(lr_scheduler="warmup_cosine", lr_initial=1e-6, lr_warmup_fraction=0.5, keep_best=True,
               eval_every=2, train_max_grad_norm=math.inf).validate()


def test_alignprop_truncation_rules() -> None:
    AlignPropConfig(truncated_backprop_timestep=30).validate()  # TRL style: unused with rand=True, as in TRL
    AlignPropConfig(truncation="refl").validate()
    AlignPropConfig(truncation="fixed", truncated_backprop_timestep=45).validate()
    AlignPropConfig(truncation="draft_k", draft_k=3, sample_num_steps=20).validate()  # minmax unused: not checked
    for kwargs, field in [
        ({"truncated_rand_backprop_minmax": (30, 10)}, "truncated_rand_backprop_minmax"),
        ({"sample_num_steps": 20}, "truncated_rand_backprop_minmax"),  # (0, 50) reaches past 20 steps
        ({"truncated_backprop_rand": False, "truncated_backprop_timestep": 50}, "truncated_backprop_timestep"),
        ({"truncation": "draft_k", "truncated_backprop_rand": False}, "truncated_backprop_rand"),
        ({"truncation": "random", "truncated_backprop_timestep": 30}, "truncated_backprop_timestep"),
        ({"draft_k": 3}, "draft_k"),  # no effect with random truncation
        ({"truncation": "draft_k", "draft_k": 51}, "draft_k"),
        ({"truncation": "refl", "refl_min_step": 45, "refl_max_step": 44}, "refl_min_step"),
        ({"reward_coefficient": 0.0}, "reward_coefficient"),
    ]:
        with pytest.raises(ConfigError) as err:
            AlignPropConfig(**kwargs).validate()
        assert set(problems(err)) == {field}, kwargs


def test_environment_check_names_the_missing_package(monkeypatch) -> None:
    from diffrl.config import accelerate_settings

    real = importlib.util.find_spec  # tensorboard is installed for the tracker tests: hide it here
    monkeypatch.setattr(accelerate_settings.importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] in ("tensorboard", "tensorboardX") else real(name, *a))
    with pytest.raises(ConfigError, match=r"log_with='tensorboard': needs the tensorboard package. Fix: pip install"):
        DDPOConfig(log_with="tensorboard").validate()
    DDPOConfig(log_with="tensorboard").validate(check_environment=False)


def test_validate_sees_fields_changed_after_construction() -> None:
    config = DDPOConfig()
    config.train_batch_size = "2"  # TRL-style attribute assignment skips __post_init__
    with pytest.raises(ConfigError, match="train_batch_size='2': expected int"):
        config.validate()


# ---- writing and loading files --------------------------------------------------------------------------


def test_yaml_round_trip(tmp_path) -> None:
    config = AlignPropConfig(run_name="1e-4", logdir="yes", truncated_rand_backprop_minmax=(3, 40),
                             reward_options={"digit": 3, "scale": 0.5, "names": ["a", "b"]}, train_adam_epsilon=1e-8,
                             negative_prompts="blurry, dark", truncation="draft_lv", model=None)
    path = tmp_path / "config.yaml"
    text = config.to_yaml(path)
    assert text.startswith("trainer: alignprop\n")
    assert AlignPropConfig.from_yaml(path) == config
    assert load_config(path) == config
    assert DDPOConfig.from_dict(DDPOConfig(seed=3).to_dict()) == DDPOConfig(seed=3)
    flat = config.to_flat_dict()
    assert flat["reward_options/digit"] == 3 and flat["model"] == "None"
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_load_config_picks_the_class(tmp_path) -> None:
    assert load_config(None) == DDPOConfig()
    path = tmp_path / "c.yaml"
    path.write_text("algorithm: rwr\nrwr_temperature: 0.2\n")
    config = load_config(path, ["sample_batch_size=2"])
    assert isinstance(config, DDPOConfig) and (config.algorithm, config.sample_batch_size) == ("rwr", 2)
    path.write_text("algorithm: refl\n")
    assert load_config(path).truncation == "refl"
    path.write_text("trainer: alignprop\ntrain_learning_rate: 1e-4\n")
    config = load_config(path, ["truncated_rand_backprop_minmax=[0,40]"])
    assert isinstance(config, AlignPropConfig) and config.truncated_rand_backprop_minmax == (0, 40)
    assert isinstance(load_config(path, ["trainer=ddpo"]), DDPOConfig)  # the command line wins
    assert isinstance(load_config(None, ["algorithm=alignprop"]), AlignPropConfig)
    path.write_text("trainer: alignprop\nalgorithm: rwr\n")
    with pytest.raises(ConfigError, match="algorithm='rwr': is a ddpo algorithm but trainer='alignprop'"):
        load_config(path)
    path.write_text("trainer: ddpo\ntruncation: refl\n")
    with pytest.raises(ConfigError, match="truncation='refl': unknown field of DDPOConfig"):
        load_config(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="not a mapping"):
        load_config(path)
