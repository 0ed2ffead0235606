"""Step math for diffusion samplers, with exact log-probabilities, and the schedules that drive it.

The step functions (``ddim.py``, ``ddpm.py``) map tensors to tensors; :mod:`~diffrl.samplers.rules` names each
sampler's step; :class:`~diffrl.samplers.denoising.DenoisingSchedule` holds a model's noise schedule and runs the
rule per step (no models: the policies in :mod:`diffrl.pipelines` call it once per denoising step);
:class:`~diffrl.samplers.dpm_solver.DPMSolverSchedule` draws clean samples without log-probabilities; ``flow.py`` holds
the flow-matching steps (Flow-GRPO's SDE, CPS, the Euler ODE) and ``flow_schedule.FlowMatchSchedule`` runs them for
the flow families (SD3, FLUX.1).
:func:`sampling_schedule` is the one place a sampler name becomes a schedule.
"""

from __future__ import annotations

from diffrl.samplers.ddim import ddim_step, ddim_variance
from diffrl.samplers.ddpm import ddpm_step
from diffrl.samplers.denoising import DenoisingSchedule, Predict, SamplerName
from diffrl.samplers.dpm_solver import DPMSolverSchedule
from diffrl.samplers.flow import cps_step, euler_step, flow_sde_step
from diffrl.samplers.flow_schedule import FLOW_SDE_TYPES, FlowMatchSchedule, FlowSDEType, is_flow_scheduler_config
from diffrl.samplers.gaussian import DeterministicStepError, gaussian_log_prob, reduce_per_sample
from diffrl.samplers.prediction import PredictionConfig, predict_x0_and_eps
from diffrl.samplers.rules import STEP_RULES, StepRule
from diffrl.samplers.schedule import alphas_at, previous_timesteps
from diffrl.samplers.types import StepOutput

__all__ = [
    "FLOW_SDE_TYPES",
    "STEP_RULES",
    "FlowMatchSchedule",
    "FlowSDEType",
    "is_flow_scheduler_config",
    "cps_step",
    "euler_step",
    "flow_sde_step",
    "DPMSolverSchedule",
    "DenoisingSchedule",
    "DeterministicStepError",
    "Predict",
    "PredictionConfig",
    "SamplerName",
    "StepOutput",
    "StepRule",
    "alphas_at",
    "ddim_step",
    "ddim_variance",
    "ddpm_step",
    "gaussian_log_prob",
    "predict_x0_and_eps",
    "previous_timesteps",
    "reduce_per_sample",
    "sampling_schedule",
]


def sampling_schedule(name: str, schedule: DenoisingSchedule | FlowMatchSchedule, *,
                      dpm_solver_order: int = 2) -> DenoisingSchedule | DPMSolverSchedule | FlowMatchSchedule:
    """The schedule of sampler ``name`` ("ddim", "ddpm" or "dpmsolver++") on a model's own ``schedule``; every kind
    has ``timesteps(n)`` and ``denoise(x, predict, n, eta=, generator=)``. A flow model's schedule is its own
    ("ddim" on the flow path: the Euler step at ``eta = 0``, its SDE above); the other names are refused."""
    if isinstance(schedule, FlowMatchSchedule):
        if name != "ddim":
            raise ValueError(f"sampler {name!r} is for noise-prediction models; a flow-matching model samples with "
                             "its Euler ODE (eta 0) or its SDE: use 'ddim'")
        return schedule
    if name == "dpmsolver++":
        return DPMSolverSchedule(schedule.scheduler.config, order=dpm_solver_order)
    return DenoisingSchedule.from_scheduler_config(schedule.scheduler.config, sampler=name)
