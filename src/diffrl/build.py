"""From a config to the objects a trainer takes: policy, reward function and prompt function."""

from __future__ import annotations

from typing import Any, Callable

from diffrl.config import SharedConfig
from diffrl.pipelines import LoraSettings
from diffrl.pipelines.auto import load_policy


def default_model() -> str:
    """The project's own 8x8 digits DDPM, shipped with the package (the offline default)."""
    from diffrl.digits import load_digits_ddpm_path

    return str(load_digits_ddpm_path())


def build_policy(config: SharedConfig):
    lora = LoraSettings(rank=config.lora_rank, alpha=config.lora_alpha,
                        target_modules=tuple(config.lora_target_modules)) if config.use_lora else None
    return load_policy(config.model or default_model(), revision=config.model_revision, use_lora=config.use_lora,
                       lora=lora)


def build_reward(config: SharedConfig) -> Callable:
    """The registered reward named by ``config.reward``; with none (and no ``model``), the ``digit`` reward:
    the digit classifier's log-probability of ``reward_options.digit`` — the offline default model's reward."""
    from diffrl import rewards

    options: dict[str, Any] = dict(config.reward_options)
    if config.reward is None:
        if config.model is not None:
            raise ValueError("config.reward is not set; name a reward (e.g. reward: aesthetic). "
                             f"Available: {', '.join(rewards.available())}.")
        return rewards.load("digit", **options)
    return rewards.load(config.reward, **options)


def build_prompt_fn(config: SharedConfig, conditional: bool) -> Callable:
    from diffrl import prompts

    if config.prompts is None:
        if conditional:
            raise ValueError("config.prompts is not set; a text-to-image model needs a prompt source "
                             f"(e.g. prompts: simple_animals). Available: {', '.join(prompts.available())}.")
        return prompts.load("empty")
    return prompts.load(config.prompts, **config.prompt_options)
