"""Credentials never appear in anything a config renders; the run still uses the real value."""

from __future__ import annotations

import pytest

from diffrl.config import ConfigError, DDPOConfig, load_config
from diffrl.config.secrets import is_secret_key, redact, register_secret_keys, resolve_env

TOKEN = "hf_s3cr3tVALUE"


def test_which_keys_are_secret() -> None:
    for key in ("token", "hf_token", "api_key", "OPENAI_API_KEY", "password", "db-password", "client_secret",
                "reward_options.token", "aws_access_key"):
        assert is_secret_key(key), key
    for key in ("tokenizer", "max_new_tokens", "digit", "keyword", "model", "passes"):
        assert not is_secret_key(key), key
    register_secret_keys({"bearer"})
    assert is_secret_key("bearer")


def test_every_rendering_is_redacted_and_the_value_is_kept(tmp_path) -> None:
    config = DDPOConfig(reward_options={"token": TOKEN, "url": f"https://user:{TOKEN}@host/score", "digit": 3,
                                        "nested": {"api_key": TOKEN}},
                        tracker_kwargs={"wandb": {"password": TOKEN}})
    rendered = [config.to_yaml(tmp_path / "config.yaml"), str(config.to_dict()), str(config.to_flat_dict()),
                (tmp_path / "config.yaml").read_text()]
    assert all(TOKEN not in text for text in rendered)
    assert "https://***@host/score" in rendered[0] and "digit: 3" in rendered[0]
    assert config.reward_options["token"] == TOKEN  # the run uses the real value
    assert config.to_dict(redact_secrets=False)["reward_options"]["token"] == TOKEN
    assert config.with_overrides(["seed=1"]).reward_options["token"] == TOKEN
    with pytest.raises(ConfigError) as err:
        DDPOConfig(reward_options={"token": TOKEN}, num_epochs=0).validate(check_environment=False)
    assert TOKEN not in str(err.value)
    assert redact(["a", "ftp://u:p@x"]) == ["a", "ftp://***@x"]


def test_secrets_from_the_environment(monkeypatch) -> None:
    config = load_config(None, ["reward_options.token=${env:DIFFRL_TEST_TOKEN}"])
    assert config.reward_options["token"] == "${env:DIFFRL_TEST_TOKEN}"
    assert "${env:DIFFRL_TEST_TOKEN}" in config.to_yaml()  # the reference is not the secret
    monkeypatch.delenv("DIFFRL_TEST_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"reward_options.token=.*DIFFRL_TEST_TOKEN, which is not set. Fix: export"):
        config.validate()
    monkeypatch.setenv("DIFFRL_TEST_TOKEN", TOKEN)
    config.validate()
    assert config.resolved("reward_options") == {"token": TOKEN}
    assert TOKEN not in config.to_yaml()
    with pytest.raises(KeyError, match="NOPE"):
        resolve_env({"a": "${env:NOPE}"}, environ={})
