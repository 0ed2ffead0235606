"""The sampling schedule a policy follows: timesteps from a diffusers scheduler, steps from a :mod:`~diffrl.samplers.rules`
rule; and the chain without log-probabilities (:meth:`DenoisingSchedule.denoise`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import torch
from diffusers import DDIMScheduler

from diffrl.samplers.ddim import ddim_step
from diffrl.samplers.prediction import PredictionConfig, predict_x0_and_eps
from diffrl.samplers.rules import STEP_RULES, StepRule
from diffrl.samplers.schedule import alphas_at, previous_timesteps
from diffrl.samplers.types import StepOutput

__all__ = ["DenoisingSchedule", "Predict", "SamplerName"]

logger = logging.getLogger(__name__)

SamplerName = Literal["ddim", "ddpm"]
Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``predict(x_t, t) -> model output`` for a ``[B]`` timestep tensor (the policy's call, conditioning bound)."""


@dataclass
class DenoisingSchedule:
    """Holds the noise schedule (never the model) and turns a model output into a transition.

    Built from the model's own scheduler config. Timesteps follow diffusers' ``DDIMScheduler.set_timesteps``
    (its ``timestep_spacing``), with ``steps_offset`` raised to at least 1 so that the last transition goes
    from ``t >= 1`` to ``t' = 0`` and is stochastic like every other (see
    :func:`diffrl.samplers.previous_timesteps`). The step is the rule of ``sampler``
    (:data:`~diffrl.samplers.rules.STEP_RULES`): "ddim" with ``eta``, "ddpm" the ancestral step.
    """

    scheduler: DDIMScheduler
    prediction: PredictionConfig
    sampler: SamplerName = "ddim"

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any], sampler: SamplerName = "ddim") -> "DenoisingSchedule":
        if sampler not in STEP_RULES:
            raise ValueError(f"sampler={sampler!r} is not supported; use one of {sorted(STEP_RULES)}.")
        offset = int(config.get("steps_offset", 0) or 0)
        if offset < 1:
            logger.info("sampling with steps_offset=1 (model config has %d) so the final step keeps a density", offset)
        scheduler = DDIMScheduler.from_config(dict(config), steps_offset=max(1, offset), set_alpha_to_one=False)
        return cls(scheduler, PredictionConfig.from_scheduler_config(scheduler.config), sampler)

    @property
    def rule(self) -> StepRule:
        return STEP_RULES[self.sampler]

    def is_stochastic(self, eta: float) -> bool:
        """Whether this sampler's steps draw noise (and have a log-probability) at ``eta``."""
        return self.rule.is_stochastic(eta)

    def stochastic_steps(self, num_inference_steps: int, eta: float) -> list[bool]:
        """Which steps of a chain at ``eta`` draw noise (all or none for these samplers)."""
        return [self.is_stochastic(eta)] * num_inference_steps

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def init_noise_sigma(self) -> float:
        return float(self.scheduler.init_noise_sigma)

    def timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``[N]`` descending timesteps for ``num_inference_steps`` steps."""
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} must be between 1 and the model's "
                f"num_train_timesteps ({self.num_train_timesteps})."
            )
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        return self.scheduler.timesteps.clone()

    def prev_timesteps(self, timesteps: torch.Tensor, num_inference_steps: int) -> torch.Tensor:
        return previous_timesteps(timesteps, self.num_train_timesteps, num_inference_steps)

    def step(
        self,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        prev_timesteps: torch.Tensor,
        *,
        eta: float,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prev_sample: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        compute_log_prob: bool = True,
    ) -> StepOutput:
        """One transition for per-sample ``timesteps``/``prev_timesteps`` of shape ``[B]``."""
        a_t, a_prev = alphas_at(self.scheduler.alphas_cumprod, timesteps, prev_timesteps, sample.ndim)
        return self.rule.step(model_output, sample, a_t, a_prev, eta=eta, config=self.prediction, generator=generator,
                              prev_sample=prev_sample, noise=noise, compute_log_prob=compute_log_prob)

    def denoise(self, x: torch.Tensor, predict: Predict, num_inference_steps: int, *, eta: float = 0.0,
                generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """The whole chain from ``x`` (the initial noise) to ``x_0``, no log-probabilities, no gradients kept."""
        batch = x.shape[0]
        for t in self.timesteps(num_inference_steps, device=x.device):
            t = t.expand(batch)
            out = predict(x, t)
            x = self.step(out, x, t, self.prev_timesteps(t, num_inference_steps), eta=eta, generator=generator,
                          compute_log_prob=False).prev_sample
        return x

    def deterministic_step(self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor,
                           prev_timesteps: torch.Tensor) -> StepOutput:
        """The deterministic DDIM step (``eta = 0``, Song et al. 2021 eq. 12 without noise) whatever the sampler:
        the ODE part of a chain whose stochastic steps are a window (MixGRPO). No log-probability."""
        a_t, a_prev = alphas_at(self.scheduler.alphas_cumprod, timesteps, prev_timesteps, sample.ndim)
        return ddim_step(model_output, sample, a_t, a_prev, eta=0.0, config=self.prediction, compute_log_prob=False)

    def output_gain(self, timesteps: torch.Tensor, prev_timesteps: torch.Tensor) -> torch.Tensor:
        """``[B]`` how far the deterministic DDIM step's mean moves per unit of model output, ``|d mean / d out|``
        (the step is affine in the output: e.g. ``sqrt(1 - abar_t') - sqrt(abar_t' (1 - abar_t) / abar_t)`` for
        noise prediction), without clipping or thresholding. GRPO-Guard's step reweighting divides by it."""
        a_t, a_prev = alphas_at(self.scheduler.alphas_cumprod, timesteps, prev_timesteps, 1)
        raw = PredictionConfig(prediction_type=self.prediction.prediction_type)
        zero = torch.zeros_like(a_t, dtype=torch.float64)
        a_t, a_prev = a_t.double(), a_prev.double()
        moved = ddim_step(torch.ones_like(zero), zero, a_t, a_prev, eta=0.0, config=raw, compute_log_prob=False).mean
        still = ddim_step(zero, zero, a_t, a_prev, eta=0.0, config=raw, compute_log_prob=False).mean
        return (moved - still).abs().float()

    def x0_from_output(self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The model's estimate of ``x_0`` at ``x_t`` for its prediction type (noise, velocity or sample), without
        the sampler's clipping or thresholding, so it stays differentiable everywhere."""
        a_t = alphas_at(self.scheduler.alphas_cumprod, timesteps, timesteps, sample.ndim)[0]
        raw = PredictionConfig(prediction_type=self.prediction.prediction_type)
        return predict_x0_and_eps(model_output, sample, a_t, raw)[0]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The forward process ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (Ho et al. 2020, eq. 4)."""
        return self.scheduler.add_noise(x0, noise, timesteps)

    def training_pair(self, x0: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, target)`` for the denoising loss: ``x_t`` from :meth:`add_noise` and the regression target of
        the model's prediction type (noise, velocity or ``x0``)."""
        x_t = self.add_noise(x0, noise, timesteps)
        kind = self.prediction.prediction_type
        if kind == "epsilon":
            return x_t, noise
        if kind == "v_prediction":
            return x_t, self.scheduler.get_velocity(x0, noise, timesteps)
        return x_t, x0
