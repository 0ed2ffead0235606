"""The sampling schedule of a flow-matching model (SD3, FLUX.1): the same interface as
:class:`~diffrl.samplers.denoising.DenoisingSchedule`, on the straight path ``x_t = (1 - t) x0 + t eps``.

Timesteps are diffusers' (``FlowMatchEulerDiscreteScheduler.set_timesteps``, with the model's shift, or FLUX's
resolution-dependent ``mu``): ``T = 1000 t`` as the transformer takes them, ``t`` its sigma; the last step lands on
``t' = 0``. The step is :mod:`~diffrl.samplers.flow`'s: Flow-GRPO's SDE (``sde_type="sde"``) or CPS (``"cps"``), with
``eta`` as the noise level ``a``; ``eta = 0`` or a step outside an SDE window is the Euler ODE step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffrl.samplers.flow import cps_step, euler_step, flow_sde_step
from diffrl.samplers.types import StepOutput

__all__ = ["FLOW_SDE_TYPES", "FlowMatchSchedule", "FlowSDEType", "is_flow_scheduler_config"]

FlowSDEType = Literal["sde", "cps"]
FLOW_SDE_TYPES: tuple[str, ...] = ("sde", "cps")

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def is_flow_scheduler_config(config: Mapping[str, Any]) -> bool:
    """Whether a scheduler config is a flow-matching one (diffusers' ``FlowMatch*`` schedulers)."""
    return str(config.get("_class_name", "")).startswith("FlowMatch")


@dataclass
class FlowMatchSchedule:
    """Turns a flow model's velocity into a transition (see the module docstring).

    Attributes:
        scheduler: the model's ``FlowMatchEulerDiscreteScheduler`` (its shift and dynamic shifting).
        sde_type: "sde" (Flow-GRPO, Liu et al. 2025) or "cps" (Wang et al. 2025).
        linear_sigmas: FLUX's pipeline passes ``sigmas = linspace(1, 1/N, N)`` before the shift; SD3's passes none.
        mu: the resolution-dependent shift of schedulers with ``use_dynamic_shifting`` (FLUX), set by the policy
            for the image size it samples (:meth:`set_mu`).
    """

    scheduler: FlowMatchEulerDiscreteScheduler
    sde_type: FlowSDEType = "sde"
    linear_sigmas: bool = False
    mu: float | None = None

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any], sde_type: FlowSDEType = "sde", *,
                              linear_sigmas: bool = False) -> "FlowMatchSchedule":
        if sde_type not in FLOW_SDE_TYPES:
            raise ValueError(f"sde_type={sde_type!r} is not a flow SDE; use one of {list(FLOW_SDE_TYPES)}.")
        return cls(FlowMatchEulerDiscreteScheduler.from_config(dict(config)), sde_type, linear_sigmas)

    def set_mu(self, mu: float | None) -> None:
        self.mu = mu

    # ----------------------------------------------------------------- the schedule
    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def is_stochastic(self, eta: float) -> bool:
        return eta > 0

    def stochastic_steps(self, num_inference_steps: int, eta: float) -> list[bool]:
        """Which steps of an ``eta`` chain draw noise: all for the SDE; for CPS all but the last (its std
        ``t' sin(a pi / 2)`` is 0 at ``t' = 0``)."""
        flags = [self.is_stochastic(eta)] * num_inference_steps
        if self.sde_type == "cps":
            flags[-1] = False
        return flags

    def sigmas(self, num_inference_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``[N + 1]`` float32 sigmas ``t`` of an ``N``-step chain, ending with 0 (diffusers' ``set_timesteps``)."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be at least 1.")
        if self.scheduler.config.use_dynamic_shifting and self.mu is None:
            raise ValueError("this flow model shifts its schedule with the image size (use_dynamic_shifting); the "
                             "policy sets mu for the size it samples")
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps) if self.linear_sigmas else None
        self.scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=self.mu)
        return self.scheduler.sigmas.clone().float()

    def timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``[N]`` descending timesteps ``1000 t`` (what the transformer takes)."""
        return self.sigmas(num_inference_steps, device)[:-1] * self.num_train_timesteps

    def prev_timesteps(self, timesteps: torch.Tensor, num_inference_steps: int) -> torch.Tensor:
        """The timestep each of ``timesteps`` steps to in an ``N``-step chain (0 after the last)."""
        grid = self.sigmas(num_inference_steps, timesteps.device) * self.num_train_timesteps
        index = (timesteps.float().unsqueeze(-1) - grid[:-1]).abs().argmin(dim=-1)
        return grid[index + 1]

    def _t(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.double() / self.num_train_timesteps

    # ----------------------------------------------------------------- steps
    def step(self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor,
             prev_timesteps: torch.Tensor, *, eta: float, generator: torch.Generator | list[torch.Generator] | None = None,
             prev_sample: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             compute_log_prob: bool = True) -> StepOutput:
        """One transition for per-sample ``[B]`` timesteps; ``eta`` is the noise level (0: the ODE step)."""
        if noise is not None:
            raise ValueError("the flow steps draw their own noise from generator; pass prev_sample to evaluate one")
        t, t_next = self._t(timesteps), self._t(prev_timesteps)
        if eta == 0:
            return euler_step(model_output, sample, t, t_next)
        step = flow_sde_step if self.sde_type == "sde" else cps_step
        return step(model_output, sample, t, t_next, noise_level=eta, generator=generator, prev_sample=prev_sample,
                    compute_log_prob=compute_log_prob)

    def deterministic_step(self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor,
                           prev_timesteps: torch.Tensor) -> StepOutput:
        """The Euler ODE step (the ODE part of a window chain). No log-probability."""
        return euler_step(model_output, sample, self._t(timesteps), self._t(prev_timesteps))

    def denoise(self, x: torch.Tensor, predict: Predict, num_inference_steps: int, *, eta: float = 0.0,
                generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """The whole chain from the initial noise to ``x_0``, no log-probabilities."""
        batch = x.shape[0]
        grid = self.sigmas(num_inference_steps, x.device) * self.num_train_timesteps
        for i in range(num_inference_steps):
            t, t_next = grid[i].expand(batch), grid[i + 1].expand(batch)
            x = self.step(predict(x, t), x, t, t_next, eta=eta, generator=generator,
                          compute_log_prob=False).prev_sample
        return x

    def output_gain(self, timesteps: torch.Tensor, prev_timesteps: torch.Tensor) -> torch.Tensor:
        """``[B]`` how far the Euler step's mean moves per unit of velocity: ``|t - t'|`` (GRPO-Guard's ``dt``)."""
        return (self._t(timesteps) - self._t(prev_timesteps)).abs().float()

    # ----------------------------------------------------------------- the forward process
    def x0_from_output(self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x0 = x_t - t v``."""
        t = self._t(timesteps).reshape(-1, *([1] * (sample.ndim - 1))).to(sample.dtype)
        return sample - t * model_output

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 - t) x0 + t noise`` (rectified flow; Liu et al. 2022, Esser et al. 2024 eq. 3)."""
        t = self._t(timesteps).reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return (1 - t) * x0 + t * noise

    def training_pair(self, x0: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, v)`` with the flow-matching target ``v = noise - x0``."""
        return self.add_noise(x0, noise, timesteps), noise - x0

