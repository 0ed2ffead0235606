"""A sampler's step as one object: which step function maps ``(x_t, model output)`` to ``x_t'`` and when that step is
stochastic. A new step (a flow-matching SDE, say) is one more rule here and one more file beside ``ddim.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from diffrl.samplers.ddim import ddim_step
from diffrl.samplers.ddpm import ddpm_step
from diffrl.samplers.prediction import PredictionConfig
from diffrl.samplers.types import StepOutput

__all__ = ["STEP_RULES", "DDIMRule", "DDPMRule", "StepRule"]


class StepRule(Protocol):
    """The transition of one sampler, on the schedule's ``abar`` values (``[B, 1, ..., 1]`` or scalars)."""

    name: str

    def is_stochastic(self, eta: float) -> bool:
        """Whether the step draws noise (and so has a log-probability) at this ``eta``."""

    def step(self, model_output: torch.Tensor, sample: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor, *,
             eta: float, config: PredictionConfig, generator: torch.Generator | list[torch.Generator] | None,
             prev_sample: torch.Tensor | None, noise: torch.Tensor | None, compute_log_prob: bool) -> StepOutput:
        """One transition; draws ``x_t'`` unless ``prev_sample`` is given to be evaluated."""


@dataclass(frozen=True)
class DDIMRule:
    """DDIM (Song et al. 2021, eqs. 12 and 16): stochastic for ``eta > 0``, the deterministic ODE step at 0."""

    name: str = "ddim"

    def is_stochastic(self, eta: float) -> bool:
        return eta > 0

    def step(self, model_output, sample, a_t, a_prev, *, eta, config, generator, prev_sample, noise,
             compute_log_prob) -> StepOutput:
        return ddim_step(model_output, sample, a_t, a_prev, eta=eta, config=config, generator=generator,
                         prev_sample=prev_sample, noise=noise, compute_log_prob=compute_log_prob)


@dataclass(frozen=True)
class DDPMRule:
    """The DDPM ancestral step (Ho et al. 2020, eqs. 6-7): always stochastic; ``eta`` does not apply."""

    name: str = "ddpm"

    def is_stochastic(self, eta: float) -> bool:
        return True

    def step(self, model_output, sample, a_t, a_prev, *, eta, config, generator, prev_sample, noise,
             compute_log_prob) -> StepOutput:
        return ddpm_step(model_output, sample, a_t, a_prev, config=config, generator=generator,
                         prev_sample=prev_sample, noise=noise, compute_log_prob=compute_log_prob)


STEP_RULES: dict[str, StepRule] = {rule.name: rule for rule in (DDIMRule(), DDPMRule())}
"""Sampler name -> its step rule."""
