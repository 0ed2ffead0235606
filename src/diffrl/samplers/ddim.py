"""The DDIM step with ``eta > 0`` as a Gaussian policy (Song et al. 2021, eqs. 12 and 16)."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from diffrl.samplers.gaussian import DeterministicStepError, Reduction, gaussian_log_prob
from diffrl.samplers.prediction import PredictionConfig, predict_x0_and_eps
from diffrl.samplers.types import StepOutput


def ddim_variance(alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor) -> torch.Tensor:
    """``sigma_t^2 / eta^2 = (1 - abar_t') / (1 - abar_t) * (1 - abar_t / abar_t')`` (DDIM eq. 16)."""
    return (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)


def ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor,
    alpha_prod_t_prev: torch.Tensor,
    *,
    eta: float,
    config: PredictionConfig = PredictionConfig(),
    use_clipped_model_output: bool = False,
    generator: torch.Generator | list[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    compute_log_prob: bool = True,
    reduction: Reduction = "mean",
) -> StepOutput:
    """One DDIM transition ``x_t -> x_t'`` with its log-probability.

    Notation (Song et al. 2021; ``abar`` is the paper's ``alpha``):
    ``x0_hat``, ``eps_hat`` from :func:`predict_x0_and_eps` (eq. 12's "predicted x_0");
    ``sigma_t = eta * sqrt(ddim_variance(abar_t, abar_t'))`` (eq. 16);
    ``mean = sqrt(abar_t') x0_hat + sqrt(1 - abar_t' - sigma_t^2) eps_hat`` (eq. 12);
    ``x_t' = mean + sigma_t z``, ``z ~ N(0, I)`` drawn from ``generator``.

    ``eta = 1`` is DDPM's ancestral variance; ``eta = 0`` is the deterministic DDIM step, allowed for
    sampling and for reward backpropagation (gradients flow through ``prev_sample``), but it has no
    log-probability: asking for one raises :class:`DeterministicStepError`.

    Args:
        model_output: ``[B, *S]`` network output at ``x_t``.
        sample: ``[B, *S]`` ``x_t``.
        alpha_prod_t, alpha_prod_t_prev: ``abar`` at ``t`` and ``t'``, scalars or ``[B, 1, ..., 1]``
            (see :func:`diffrl.samplers.schedule.alphas_at`).
        eta: DDIM's noise weight, ``>= 0``.
        generator: source of the step noise (used for every draw; a list gives one per sample).
        prev_sample: evaluate this given ``x_t'`` instead of drawing one (training recomputes
            log-probabilities of recorded transitions this way; it is treated as data, no gradient).
        noise: use this ``z`` instead of drawing one (e.g. to share noise between runs).
        compute_log_prob: set ``False`` to skip the density (sampling with ``eta = 0``).
        reduction: how the per-element log-density is reduced (see :func:`gaussian_log_prob`).
    """
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0 (0 is deterministic DDIM, 1 is DDPM's variance).")
    if prev_sample is not None and (generator is not None or noise is not None):
        raise ValueError("Pass either prev_sample (to evaluate it) or generator/noise (to draw one), not both.")
    x0, eps = predict_x0_and_eps(model_output, sample, alpha_prod_t, config, use_clipped_model_output)
    std = eta * ddim_variance(alpha_prod_t, alpha_prod_t_prev).clamp(min=0).sqrt()
    std = torch.as_tensor(std, dtype=sample.dtype, device=sample.device)
    if std.ndim == 0:
        std = std.reshape((1,) * sample.ndim).expand((sample.shape[0],) + (1,) * (sample.ndim - 1))
    # 1 - abar_t' - sigma^2 can dip a hair below 0 in low precision when eta = 1 at the last step.
    direction = (1 - alpha_prod_t_prev - std**2).clamp(min=0).sqrt() * eps
    mean = alpha_prod_t_prev.sqrt() * x0 + direction
    if prev_sample is None:
        if eta > 0:
            if noise is None:
                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                     dtype=model_output.dtype)
            prev_sample = mean + std * noise
        else:
            prev_sample = mean
    log_prob = None
    if compute_log_prob:
        if eta == 0:
            raise DeterministicStepError(
                "a log-probability was requested for a DDIM step with eta = 0, which is deterministic "
                "and has no density. Use eta > 0 (DDPO uses 1.0) or pass compute_log_prob=False."
            )
        log_prob = gaussian_log_prob(prev_sample.detach(), mean, std, reduction)
    return StepOutput(prev_sample.to(sample.dtype), mean, std, log_prob, x0)
