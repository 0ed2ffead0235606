"""DPM-Solver++ (Lu et al. 2022) for drawing clean samples without log-probabilities (DiffusionNFT's data): diffusers'
multistep solver on the model's own noise schedule, behind the same ``timesteps`` / ``denoise`` as
:class:`~diffrl.samplers.denoising.DenoisingSchedule`."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import DPMSolverMultistepScheduler

from diffrl.samplers.denoising import Predict

__all__ = ["DPMSolverSchedule"]


class DPMSolverSchedule:
    """Multistep DPM-Solver++ of ``order`` 1-3; deterministic (``eta`` and ``generator`` are not used)."""

    def __init__(self, scheduler_config: Mapping[str, Any], order: int = 2) -> None:
        if order not in (1, 2, 3):
            raise ValueError(f"DPM-Solver++ order={order} must be 1, 2 or 3.")
        self.scheduler = DPMSolverMultistepScheduler.from_config(dict(scheduler_config), algorithm_type="dpmsolver++",
                                                                 solver_order=order)

    def timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``[N]`` descending timesteps (also resets the solver's history of model outputs)."""
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        return self.scheduler.timesteps.clone()

    def denoise(self, x: torch.Tensor, predict: Predict, num_inference_steps: int, *, eta: float = 0.0,
                generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """The whole chain from ``x`` (the initial noise) to ``x_0``."""
        batch = x.shape[0]
        for t in self.timesteps(num_inference_steps, device=x.device):
            x = self.scheduler.step(predict(x, t.expand(batch)), t, x).prev_sample
        return x
