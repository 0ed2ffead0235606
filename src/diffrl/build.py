"""From a config to the objects a trainer takes: policy, reward function and prompt function.

Shared by ``diffrl train`` and by ``diffrl sample / evaluate / report``, which rebuild a run's base model, LoRA
settings and reward from its ``config.yaml``.
"""

from __future__ import annotations

from typing import Any, Callable

from diffrl import prompts, rewards
from diffrl.config import AlignPropConfig, ConfigError, SharedConfig, Violation
from diffrl.config.shared import SDXL_SIZE_FIELDS, SIZE_FIELDS
from diffrl.digits import load_digits_ddpm_path
from diffrl.pipelines import LoraSettings
from diffrl.pipelines.auto import load_policy, model_kind
from diffrl.pipelines.loading import load_vae


def default_model() -> str:
    """The project's own 8x8 digits DDPM, shipped with the package (the offline default)."""
    return str(load_digits_ddpm_path())


def base_model(config: SharedConfig) -> str:
    """The model a run fine-tunes: ``model``, or the digits DDPM when unset."""
    return config.model or default_model()


def uses_lora(config: SharedConfig) -> bool:
    return bool(config.train_lora)


def lora_settings(config: SharedConfig) -> LoraSettings | None:
    """The run's LoRA settings, or ``None`` for full fine-tuning."""
    if not uses_lora(config):
        return None
    return LoraSettings(rank=config.lora_rank, alpha=config.lora_alpha, target_modules=tuple(config.lora_target_modules))


def build_policy(config: SharedConfig, **kwargs: Any):
    """The run's policy (``kwargs``: ``device``, ``mixed_precision`` for loading outside a trainer), with the
    config's VAE and SDXL size conditioning applied (the trainer turns on gradient checkpointing); settings the loaded model cannot take
    are a :class:`ConfigError` (:func:`check_policy_settings`)."""
    policy = load_policy(base_model(config), revision=config.model_revision, use_lora=uses_lora(config),
                         lora=lora_settings(config), **kwargs)
    check_policy_settings(config, policy)
    if config.vae is not None:
        replace_vae(policy, config.vae)
    if policy.kind == "sdxl":
        for name, attribute in zip(SDXL_SIZE_FIELDS, ("original_size", "target_size", "crops_coords_top_left")):
            value = getattr(config, name)
            if value != type(config)._default(name):  # unset: keep what a loaded diffrl result recorded
                setattr(policy, attribute, tuple(value))
    return policy


_KIND_WORDS = {"ddpm": "an unconditional pixel-space DDPM", "stable_diffusion": "a Stable Diffusion model",
               "sdxl": "an SDXL model"}


def _model_words(config: SharedConfig, kind: str) -> str:
    words = _KIND_WORDS.get(kind, f"a {kind} model")
    return f"model={config.model!r} is {words}" if config.model else f"the default digits model is {words}"


def kind_violations(config: SharedConfig, kind: str) -> list[Violation]:
    """Settings a model of ``kind`` cannot honour: sample sizes or a VAE on a DDPM (its size is fixed, it has no
    VAE), SDXL size conditioning on anything but SDXL."""
    what, violations = _model_words(config, kind), []
    if kind == "ddpm":
        for name in SIZE_FIELDS:
            if getattr(config, name) is not None:
                violations.append(Violation(name, getattr(config, name), f"cannot be set: {what}, whose image size "
                                            "is fixed by its UNet", f"remove {name} (null)"))
        if config.vae is not None:
            violations.append(Violation("vae", config.vae, f"cannot be set: {what}, which has no VAE",
                                        "remove vae (null)"))
    if kind != "sdxl":
        for name in SDXL_SIZE_FIELDS:
            value = getattr(config, name)
            if value != type(config)._default(name):
                violations.append(Violation(name, value, f"is SDXL size conditioning, but {what}",
                                            f"remove {name}, or use an SDXL model"))
    return violations


def _raise(violations: list[Violation], config: SharedConfig) -> None:
    if violations:
        raise ConfigError(violations, f"{type(config).__name__} does not fit the model")


def check_model_settings(config: SharedConfig) -> None:
    """:func:`kind_violations` of the configured model, read from its small files before any weights load (so
    ``diffrl train`` refuses an SDXL-only setting on an SD model in a second, not after minutes of loading)."""
    _raise(kind_violations(config, model_kind(base_model(config), config.model_revision)), config)


def check_policy_settings(config: SharedConfig, policy: Any) -> None:
    """Refuse settings that the loaded model cannot honour: those of :func:`kind_violations`, and sample sizes not
    a multiple of the VAE's factor (known once it is loaded). One :class:`ConfigError` naming every such field."""
    violations = kind_violations(config, policy.kind)
    if policy.kind != "ddpm":
        factor = getattr(policy, "vae_scale_factor", 8)
        for name in SIZE_FIELDS:
            value = getattr(config, name)
            if value is not None and value % factor:
                violations.append(Violation(name, value, f"is not a multiple of {factor}, the VAE factor of the model",
                                            f"set {name}={max(factor, -(-value // factor) * factor)}"))
    _raise(violations, config)


def replace_vae(policy: Any, source: str) -> None:
    """Swap the policy's VAE for ``source`` (a folder, single file or Hub id; see
    :func:`~diffrl.pipelines.loading.load_vae`), placed on the policy's device and precision."""
    vae = load_vae(source).requires_grad_(False).eval()
    policy.pipeline.vae = vae
    policy.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    policy.vae_source = source  # recorded in a result's diffrl_model.json
    policy.to(policy.device, policy.mixed_precision)


def apply_gradient_checkpointing(policy: Any, config: SharedConfig) -> None:
    """With ``gradient_checkpointing``, the UNet recomputes its blocks' activations in the backward pass
    (diffusers' ``enable_gradient_checkpointing``; active only where gradients are on, so sampling is unchanged).
    AlignProp's trainer checkpoints each UNet call of the chain itself, so its UNet is left as is."""
    if not config.gradient_checkpointing or isinstance(config, AlignPropConfig):
        return
    unet = policy.trainable_module
    if not getattr(unet, "_supports_gradient_checkpointing", False):
        raise ConfigError([Violation("gradient_checkpointing", True, f"is not supported by the model's "
                                     f"{type(unet).__name__}", "set gradient_checkpointing=false")])
    unet.enable_gradient_checkpointing()


def build_reward(config: SharedConfig) -> Callable:
    """The registered reward named by ``config.reward``; with none (and no ``model``), the ``digit`` reward:
    the digit classifier's log-probability of ``reward_options.digit`` — the offline default model's reward."""
    options: dict[str, Any] = config.resolved("reward_options")  # ${env:NAME} secrets filled in here only
    if config.reward is None:
        if config.model is not None:
            raise ConfigError([Violation("reward", None, "is not set, and only the default digits model has a "
                                         "default reward", f"name one: reward=aesthetic (available: "
                                         f"{', '.join(rewards.available())})")])
        return rewards.load("digit", **options)
    return rewards.load(config.reward, **options)


def build_prompt_fn(config: SharedConfig, conditional: bool) -> Callable:
    if config.prompts is None:
        if conditional:
            raise ConfigError([Violation("prompts", None, "is not set, but a text-to-image model needs a prompt "
                                         "source", f"name one: prompts=simple_animals (available: "
                                         f"{', '.join(prompts.available())})")])
        return prompts.load("empty")
    return prompts.load(config.prompts, **config.resolved("prompt_options"))
