"""The DDPM ancestral step with its log-probability (Ho et al. 2020, eqs. 6-7), for pixel-space models."""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.utils.torch_utils import randn_tensor

from diffrl.samplers.gaussian import Reduction, gaussian_log_prob
from diffrl.samplers.prediction import PredictionConfig, predict_x0_and_eps
from diffrl.samplers.types import StepOutput

VarianceType = Literal["fixed_small", "fixed_large"]


def ddpm_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor,
    alpha_prod_t_prev: torch.Tensor,
    *,
    config: PredictionConfig = PredictionConfig(),
    variance_type: VarianceType = "fixed_small",
    generator: torch.Generator | list[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    compute_log_prob: bool = True,
    reduction: Reduction = "mean",
) -> StepOutput:
    """One ancestral step ``x_t -> x_t'`` from the posterior ``q(x_t' | x_t, x0_hat)``.

    With ``alpha = abar_t / abar_t'`` and ``beta = 1 - alpha`` (strided steps use the effective values,
    as diffusers' ``DDPMScheduler`` does), Ho et al. 2020 eq. 7:
    ``mean = sqrt(abar_t') beta / (1 - abar_t) x0_hat + sqrt(alpha) (1 - abar_t') / (1 - abar_t) x_t``;
    variance ``beta_tilde = (1 - abar_t') / (1 - abar_t) beta`` (``fixed_small``) or ``beta`` (``fixed_large``).
    ``fixed_small`` is exactly the DDIM variance at ``eta = 1``, and the mean then coincides with DDIM's.

    At the final step the policies use ``abar_t' = alphas_cumprod[0]`` (see
    :func:`diffrl.samplers.schedule.previous_timesteps`), so ``beta_tilde > 0`` and the step keeps a density.
    Arguments are as for :func:`diffrl.samplers.ddim.ddim_step`.
    """
    if prev_sample is not None and (generator is not None or noise is not None):
        raise ValueError("Pass either prev_sample (to evaluate it) or generator/noise (to draw one), not both.")
    x0, _ = predict_x0_and_eps(model_output, sample, alpha_prod_t, config)
    alpha = alpha_prod_t / alpha_prod_t_prev
    beta = 1 - alpha
    coef_x0 = alpha_prod_t_prev.sqrt() * beta / (1 - alpha_prod_t)
    coef_xt = alpha.sqrt() * (1 - alpha_prod_t_prev) / (1 - alpha_prod_t)
    mean = coef_x0 * x0 + coef_xt * sample
    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * beta if variance_type == "fixed_small" else beta
    if variance_type not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance_type={variance_type!r} is not supported; use 'fixed_small' or 'fixed_large'.")
    std = torch.as_tensor(variance, dtype=sample.dtype, device=sample.device).clamp(min=0).sqrt()
    if std.ndim == 0:
        std = std.reshape((1,) * sample.ndim).expand((sample.shape[0],) + (1,) * (sample.ndim - 1))
    if prev_sample is None:
        if noise is None:
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=model_output.dtype)
        prev_sample = mean + std * noise
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std, reduction) if compute_log_prob else None
    return StepOutput(prev_sample.to(sample.dtype), mean, std, log_prob, x0)
