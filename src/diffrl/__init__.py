"""diffrl: fine-tune diffusion models against reward functions (DDPO, AlignProp, DRaFT, ReFL, GRPO, DiffusionNFT).

The public API, imported lazily so that ``diffrl --help`` does not load torch and diffusers.
Policies (:mod:`diffrl.pipelines`) sample trajectories with exact log-probabilities; samplers
(:mod:`diffrl.samplers`) hold the step math.
"""

from __future__ import annotations

import importlib
from typing import Any

from diffrl._version import __version__

_EXPORTS = {
    "DDPMPolicy": "diffrl.pipelines",
    "DiffusionPolicy": "diffrl.pipelines",
    "LoraSettings": "diffrl.pipelines",
    "ModelLoadError": "diffrl.pipelines",
    "StableDiffusionPolicy": "diffrl.pipelines",
    "StableDiffusionXLPolicy": "diffrl.pipelines",
    "StableDiffusion3Policy": "diffrl.pipelines",
    "FluxPolicy": "diffrl.pipelines",
    "SDXLConditioning": "diffrl.pipelines",
    "TextConditioning": "diffrl.pipelines",
    "Trajectory": "diffrl.pipelines",
    "DDPOConfig": "diffrl.config",
    "AlignPropConfig": "diffrl.config",
    "NFTConfig": "diffrl.config",
    "GRPOConfig": "diffrl.config",
    "AWMConfig": "diffrl.config",
    "DGPOConfig": "diffrl.config",
    "DDPOTrainer": "diffrl.recipes.trainers",
    "AlignPropTrainer": "diffrl.recipes.trainers",
    "NFTTrainer": "diffrl.recipes.trainers",
    "GRPOTrainer": "diffrl.recipes.trainers",
    "AWMTrainer": "diffrl.recipes.trainers",
    "DGPOTrainer": "diffrl.recipes.trainers",
    "DDPOPipelineOutput": "diffrl.pipelines.trl_compat",
    "DDPOSchedulerOutput": "diffrl.pipelines.trl_compat",
    "DDPOStableDiffusionPipeline": "diffrl.pipelines.trl_compat",
    "DefaultDDPODDPMPipeline": "diffrl.pipelines.trl_compat",
    "DefaultDDPOStableDiffusionPipeline": "diffrl.pipelines.trl_compat",
    "DefaultDDPOStableDiffusionXLPipeline": "diffrl.pipelines.trl_compat",
}

_SUBMODULES = ("prompts", "rewards")
"""Submodules reachable as attributes (``diffrl.rewards.load(...)``) after a bare ``import diffrl``."""

__all__ = sorted(_EXPORTS) + ["__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"diffrl.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffrl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
