"""Pure step math for stochastic diffusion samplers, with exact log-probabilities.

No models and no I/O: every function maps tensors to tensors. The policies in
:mod:`diffrl.pipelines` call these once per denoising step.
"""

from diffrl.samplers.ddim import ddim_step, ddim_variance
from diffrl.samplers.ddpm import ddpm_step
from diffrl.samplers.gaussian import DeterministicStepError, gaussian_log_prob, reduce_per_sample
from diffrl.samplers.prediction import PredictionConfig, predict_x0_and_eps
from diffrl.samplers.types import StepOutput
from diffrl.samplers.schedule import alphas_at, previous_timesteps

__all__ = [
    "DeterministicStepError",
    "PredictionConfig",
    "StepOutput",
    "alphas_at",
    "ddim_step",
    "ddim_variance",
    "ddpm_step",
    "gaussian_log_prob",
    "predict_x0_and_eps",
    "previous_timesteps",
    "reduce_per_sample",
]
