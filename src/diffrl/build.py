"""From a config to the objects a trainer takes: policy, reward function and prompt function.

Shared by ``diffrl train`` and by ``diffrl sample / evaluate / report``, which rebuild a run's base model, LoRA
settings and reward from its ``config.yaml``.
"""

from __future__ import annotations


from typing import Any, Callable

from diffrl import prompts, rewards
from diffrl.config import AlignPropConfig, ConfigError, SharedConfig, Violation
from diffrl.digits import load_digits_ddpm_path
from diffrl.pipelines import LoraSettings
from diffrl.pipelines.auto import load_policy, model_kind, policy_class


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
    family's settings of the config applied (``policy.configure``: a VAE, size conditioning; the trainer turns on
    gradient checkpointing); settings the loaded model cannot take are a :class:`ConfigError`
    (:func:`check_policy_settings`)."""
    family = model_family(config)
    at_load = {k: v for k, v in config.model_options.items() if k in family.load_time_options}
    policy = load_policy(base_model(config), revision=config.model_revision, use_lora=uses_lora(config),
                         lora=lora_settings(config), **at_load, **kwargs)
    check_policy_settings(config, policy)
    policy.configure(config)
    return policy


def _model_words(config: SharedConfig, family: type) -> str:
    return f"model={config.model!r} is {family.description}" if config.model else \
        f"the default digits model is {family.description}"


def _raise(violations: list[Violation], config: SharedConfig) -> None:
    if violations:
        raise ConfigError(violations, f"{type(config).__name__} does not fit the model")


def model_family(config: SharedConfig) -> type:
    """The policy class of the configured model's family, read from its small files (no weights load)."""
    return policy_class(model_kind(base_model(config), config.model_revision))


def check_model_settings(config: SharedConfig) -> None:
    """The settings the configured model's family cannot take, read from its small files before any weights load
    (so ``diffrl train`` refuses a setting of another family in a second, not after minutes of loading)."""
    family = model_family(config)
    _raise(family.setting_violations(config, _model_words(config, family)), config)


def check_policy_settings(config: SharedConfig, policy: Any) -> None:
    """Refuse settings that the loaded model cannot honour: its family's (see :func:`check_model_settings`) and
    those known once loaded (e.g. sample sizes the VAE cannot produce). One :class:`ConfigError` naming each."""
    family = type(policy)
    _raise(family.setting_violations(config, _model_words(config, family)) + policy.loaded_violations(config), config)


def policy_record(config: SharedConfig, policy: Any) -> dict[str, Any]:
    """The model and LoRA fields of what really runs: the policy's (a policy built by the caller, TRL-style, decides
    them; the config may not name the model at all). The run records these, so checkpoints and reports rebuild it."""
    record: dict[str, Any] = {"train_lora": bool(policy.use_lora)}
    if getattr(policy, "base_model", None) not in (None, default_model()):
        record["model"] = policy.base_model
    if policy.use_lora:
        alpha = policy.lora.alpha
        record.update(lora_rank=policy.lora.rank, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
                      lora_target_modules=list(policy.lora.target_modules))
    return record


def check_policy_matches_config(config: SharedConfig, policy: Any) -> None:
    """A LoRA field set in the config (away from its default) that the given policy does not have is an error: the
    policy decides, and ignoring the field would be a silent correction."""
    violations = []
    for name, value in policy_record(config, policy).items():
        configured = getattr(config, name)
        if name == "model" or configured == type(config)._default(name) or configured == value:
            continue
        violations.append(Violation(name, configured, f"differs from the policy the trainer was given ({name}="
                                    f"{value!r}), which decides", "build the policy with the same settings (e.g. "
                                    "LoraSettings(rank=..., alpha=...)), or remove the field"))
    _raise(violations, config)


def apply_gradient_checkpointing(policy: Any, config: SharedConfig) -> None:
    """With ``gradient_checkpointing``, the trained network recomputes its blocks' activations in the backward pass
    (diffusers' ``enable_gradient_checkpointing``; active only where gradients are on, so sampling is unchanged).
    AlignProp's trainer checkpoints each model call of the chain itself, so its network is left as is."""
    if not config.gradient_checkpointing or isinstance(config, AlignPropConfig):
        return
    module = policy.trainable_module
    if not getattr(module, "_supports_gradient_checkpointing", False):
        raise ConfigError([Violation("gradient_checkpointing", True, f"is not supported by the model's "
                                     f"{type(module).__name__}", "set gradient_checkpointing=false")])
    module.enable_gradient_checkpointing()


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
    options = config.resolved("prompt_options")
    if prompts.SOURCES.takes_option(config.prompts, "seed"):
        options.setdefault("seed", config.seed)  # the run's seed, unless the source's own is given
    return prompts.load(config.prompts, **options)


def build_eval_prompt_fn(config: SharedConfig) -> Callable | None:
    """The held-out prompt source of training-time evaluation (``eval_prompts``, seeded with ``eval_seed`` unless
    its options give a seed), or None: evaluation then draws from the training prompts."""
    if config.eval_prompts is None:
        return None
    options = config.resolved("eval_prompt_options")
    if prompts.SOURCES.takes_option(config.eval_prompts, "seed"):
        options.setdefault("seed", config.eval_seed)
    return prompts.load(config.eval_prompts, **options)


def build_eval_rewards(config: SharedConfig) -> dict[str, Callable]:
    """The held-out rewards of training-time evaluation (``eval_rewards``: name or reference -> options), built
    (their models load on first use) with ``${env:NAME}`` options resolved."""
    resolved = config.resolved("eval_rewards")
    return {name: rewards.load(name, **(options or {})) for name, options in resolved.items()}
