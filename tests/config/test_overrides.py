"""``key=value`` and ``--field value``: one reading everywhere."""

from __future__ import annotations

import pytest

from diffrl.config import AlignPropConfig, ConfigError, KeyValueError, from_cli_args, load_config, parse_key_value


def test_parse_key_value_reads_yaml_1_2() -> None:
    assert parse_key_value("digit=7") == ("digit", 7)
    assert parse_key_value("dtype=bfloat16") == ("dtype", "bfloat16")
    assert parse_key_value("classes=[6,7,8]") == ("classes", [6, 7, 8])  # what JSON gave before
    assert parse_key_value('w={"a": 1.5}') == ("w", {"a": 1.5})
    assert parse_key_value("flag=no") == ("flag", "no")  # YAML 1.2: a string, not False
    assert parse_key_value("n=010") == ("n", 10)
    assert parse_key_value("lr=1e-4") == ("lr", 1e-4)
    assert parse_key_value("x=null") == ("x", None)
    assert parse_key_value("url=http://h:1/a=b") == ("url", "http://h:1/a=b")
    assert parse_key_value("bad=[1,") == ("bad", "[1,")  # not YAML: the text
    with pytest.raises(KeyValueError, match="not a key=value pair"):
        parse_key_value("novalue")
    with pytest.raises(KeyValueError):
        parse_key_value("=3")


def test_hf_argument_parser_style_is_accepted() -> None:
    assert from_cli_args(["--num_epochs=3", "--seed", "4", "run_name=a", "--truncated_rand_backprop_minmax", "0",
                          "10", "--train-batch-size", "2", "--per_prompt_stat_tracking", "--no_train_cfg",
                          "--lora_target_modules", "to_q", "to_v"]) == [
        "num_epochs=3", "seed=4", "run_name=a", "truncated_rand_backprop_minmax=[0, 10]", "train_batch_size=2",
        "per_prompt_stat_tracking=true", "train_cfg=false", 'lora_target_modules=["to_q", "to_v"]']
    assert from_cli_args(["--seed", "-1"]) == ["seed=-1"]
    with pytest.raises(KeyValueError, match="neither field=value nor --field value"):
        from_cli_args(["stray"])


def test_cli_forms_load_the_same_config() -> None:
    flags = load_config(None, from_cli_args(["--trainer", "alignprop", "--truncated_rand_backprop_minmax", "0", "10",
                                             "--sample_num_steps=10", "--lora_target_modules", "to_q"]))
    pairs = load_config(None, ["trainer=alignprop", "truncated_rand_backprop_minmax=[0,10]", "sample_num_steps=10",
                               "lora_target_modules=[to_q]"])
    assert flags == pairs and isinstance(flags, AlignPropConfig)
    assert flags.truncated_rand_backprop_minmax == (0, 10) and flags.lora_target_modules == ["to_q"]
    with pytest.raises(ConfigError, match="did you mean 'num_epochs'"):
        load_config(None, from_cli_args(["--num_epoch", "3"]))
