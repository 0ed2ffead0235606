"""A training run's base model and fine-tuned result, compared on the same noise with the run's own settings."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from diffrl import build
from diffrl.config import SharedConfig, load_config
from diffrl.config.secrets import REDACTED
from diffrl.evaluate.compare import Evaluation, ModelSource, evaluate_models
from diffrl.evaluate.inputs import TRAIN, EvaluationError, PromptItem, draw_prompts
from diffrl.evaluate.loading import load_model
from diffrl.evaluate.sample import SampleSettings


def _given_or(given: Any, default: Any) -> Any:
    return default if given is None else given


def compare_run(run_dir: str | os.PathLike, *, model: str | os.PathLike | None = None, num_prompts: int = 4,
                seeds: Sequence[int] = (0, 1, 2, 3), num_inference_steps: int | None = None,
                guidance_scale: float | None = None, eta: float | None = None, batch_size: int = 8,
                device: str = "cpu", mixed_precision: str = "no",
                log: Callable[[str], None] | None = None, config: SharedConfig | None = None,
                preview_seeds: int | None = None) -> Evaluation:
    """Sample the run's base model (``model:`` of its ``config.yaml``; the digits DDPM when unset) and its
    fine-tuned ``model`` (default ``run_dir/final``) from the same noise, on ``num_prompts`` prompts of the run's
    held-out ``eval_prompts`` or else its training prompt source (all of them when it has fewer), and score them with the run's reward. Steps, guidance and eta default to the run's
    ``sample_*`` settings; the first ``preview_seeds`` (default: all) are shown as images, every seed is scored.
    ``config`` is the run's live config (with its credentials, which the recorded
    ``config.yaml`` never holds); without it the record is read, and a credential the reward needs is an error."""
    run = Path(run_dir)
    tuned = Path(model) if model is not None else run / "final"
    if not tuned.exists():
        raise EvaluationError(f"no fine-tuned model at '{tuned}' (the run has not finished?); give --model PATH, "
                              "or --no-samples for curves and metrics only")
    if not (run / "config.yaml").is_file():
        raise EvaluationError(f"'{run}' has no config.yaml to read the base model and reward from; use --no-samples")
    config = config if config is not None else load_config(run / "config.yaml", recorded=True)
    for name in ("reward_options", "prompt_options"):
        for key, value in getattr(config, name).items():
            if value == REDACTED:
                raise EvaluationError(
                    f"the run's {name}.{key} is a credential, which run records never hold; train with "
                    f"{name}.{key}='${{env:NAME}}' (read from the environment again here), or use --no-samples")
    base = build.base_model(config)
    reward_name = config.reward or "digit"
    source, options = (config.eval_prompts, "eval_prompt_options") if config.eval_prompts else (config.prompts,
                                                                                                 "prompt_options")
    if source and build.model_family(config).is_conditional:  # an unconditional model ignores prompts
        drawn = draw_prompts(source, num_prompts, config.resolved(options), setting="the run's prompts",
                             at_most=True)
        if len(drawn) < num_prompts and log is not None:
            log(f"the run's prompt source has {len(drawn)} distinct prompt(s); showing all of them")
        prompts = [PromptItem(text, meta, TRAIN) for text, meta in drawn]
    else:
        prompts = [PromptItem("", {}, TRAIN)]
    settings = SampleSettings(num_inference_steps=_given_or(num_inference_steps, config.sample_num_steps),
                              guidance_scale=_given_or(guidance_scale, config.sample_guidance_scale),
                              eta=_given_or(eta, config.sample_eta), batch_size=batch_size,
                              height=config.sample_height, width=config.sample_width)

    def loader(source: str, lora_base: str | None) -> Callable[[], Any]:
        return lambda: load_model(source, revision=config.model_revision if lora_base is None else "main",
                                  base=lora_base, base_revision=config.model_revision, device=device,
                                  mixed_precision=mixed_precision, strict_base=False).policy

    def base_loader() -> Any:  # the run's base model as the run saw it (its VAE and SDXL size conditioning)
        return build.build_policy(dataclasses.replace(config, train_lora=False), device=device,
                                  mixed_precision=mixed_precision)

    models = [ModelSource("base", base_loader, {"source": base, "role": "base"}),
              ModelSource(tuned.name, loader(str(tuned), base), {"source": str(tuned), "role": "fine-tuned"})]
    return evaluate_models(models, {reward_name: build.build_reward(config)}, prompts, list(seeds), settings,
                           trained_reward=reward_name, reward_options={reward_name: dict(config.reward_options)},
                           preview_prompts=num_prompts,
                           preview_seeds=len(seeds) if preview_seeds is None else preview_seeds, log=log)
