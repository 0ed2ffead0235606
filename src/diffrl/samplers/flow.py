"""Step math of flow-matching (rectified-flow) models, with exact log-probabilities: the seam SD3 and FLUX need.

A flow model predicts the velocity ``v = eps - x0`` along the straight path ``x_t = (1 - t) x0 + t eps``, with
``t`` (diffusers' ``sigma``) running from 1 (noise) to 0 (data). Three steps from ``t`` to ``t' < t``, each
``[B, *S]`` tensors in and a :class:`~diffrl.samplers.types.StepOutput` out:

- :func:`euler_step`: the deterministic ODE step ``x' = x + v (t' - t)`` (evaluation, and the ODE part of a window);
- :func:`flow_sde_step`: Flow-GRPO's SDE (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online
  RL", eq. 8-9): the reverse-time SDE that keeps the ODE's marginals, discretised by Euler-Maruyama,
  ``x' = x + [v + s_t^2 / (2 t) (x + (1 - t) v)] dt + s_t sqrt(|dt|) xi`` with ``dt = t' - t < 0`` and
  ``s_t = a sqrt(t / (1 - t))``, ``a`` the noise level (Flow-GRPO: 0.7);
- :func:`cps_step`: coefficients-preserving sampling (Wang et al. 2025, arXiv 2509.05952): DDIM's rule on the flow
  path, ``x' = (1 - t') x0_hat + sqrt(t'^2 - s^2) eps_hat + s xi`` with ``s = t' sin(a pi / 2)``, so the sample's
  coefficients on ``x0`` and on (total) noise are exactly the schedule's at ``t'``.

``x0_hat = x - t v`` and ``eps_hat = x + (1 - t) v``. Log-probabilities are Gaussian densities of ``x'`` around the
step's mean (:func:`~diffrl.samplers.gaussian.gaussian_log_prob`, mean-reduced as every diffrl sampler), computed
in float32 or better. The formulas are the papers'; the code is written here.
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor

from diffrl.samplers.gaussian import Reduction, gaussian_log_prob
from diffrl.samplers.types import StepOutput

__all__ = ["cps_step", "euler_step", "flow_sde_step", "flow_sde_std"]


def _times(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """``t`` as a ``[B, 1, ..., 1]`` float64 tensor broadcastable to ``like``."""
    t = torch.as_tensor(t, dtype=torch.float64, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def _finish(mean: torch.Tensor, std: torch.Tensor, x0: torch.Tensor, *,
            generator: torch.Generator | list[torch.Generator] | None, prev_sample: torch.Tensor | None,
            compute_log_prob: bool, reduction: Reduction, dtype: torch.dtype) -> StepOutput:
    """Draw (or take) ``x'`` and its log-probability. A row whose std is 0 (CPS landing on ``t' = 0``) is
    deterministic: its log-probability is 0, as the chain records for every deterministic step (so a ratio there
    is exactly 1 and carries no gradient)."""
    std = std.expand(mean.shape[0], *std.shape[1:])
    noisy = std > 0
    if prev_sample is None:
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=torch.float64) \
            if bool(noisy.any()) else torch.zeros_like(mean)
        prev_sample = (mean + std * noise).to(dtype)
    log_prob = None
    if compute_log_prob:  # computed in float64, returned in the sample's precision (at least float32)
        log_prob = gaussian_log_prob(prev_sample.detach().double(), mean, torch.where(noisy, std, 1.0), reduction)
        log_prob = torch.where(noisy.flatten(), log_prob, 0.0).to(torch.promote_types(dtype, torch.float32))
    return StepOutput(prev_sample, mean.to(dtype), std.to(dtype), log_prob, x0.to(dtype))


def euler_step(velocity: torch.Tensor, sample: torch.Tensor, t: torch.Tensor | float,
               t_next: torch.Tensor | float) -> StepOutput:
    """The deterministic flow ODE step ``x + v (t' - t)`` (std 0, no log-probability)."""
    tt, tn = _times(t, sample), _times(t_next, sample)
    v, x = velocity.double(), sample.double()
    mean = x + v * (tn - tt)
    return StepOutput(mean.to(sample.dtype), mean.to(sample.dtype), torch.zeros_like(tt).to(sample.dtype), None,
                      (x - tt * v).to(sample.dtype))


def flow_sde_std(t: torch.Tensor, noise_level: float, t_max: torch.Tensor | float | None = None) -> torch.Tensor:
    """``s_t = a sqrt(t / (1 - t))``. At ``t = 1``, where it diverges, the denominator takes ``t_max`` instead (as
    Flow-GRPO does with the schedule's second sigma: ``sqrt(1 / (1 - t_max))``)."""
    t = t.double()
    below = t
    if t_max is not None:
        below = torch.where(t >= 1.0, torch.as_tensor(t_max, dtype=t.dtype, device=t.device), t)
    if bool((below >= 1.0).any()):
        raise ValueError("flow_sde_std at t = 1 is infinite: give t_max (the largest t of the schedule below 1)")
    return noise_level * torch.sqrt(t / (1.0 - below))


def flow_sde_step(velocity: torch.Tensor, sample: torch.Tensor, t: torch.Tensor | float,
                  t_next: torch.Tensor | float, *, noise_level: float = 0.7, t_max: float | None = None,
                  generator: torch.Generator | list[torch.Generator] | None = None, prev_sample: torch.Tensor | None = None,
                  compute_log_prob: bool = True, reduction: Reduction = "mean") -> StepOutput:
    """Flow-GRPO's SDE step from ``t`` to ``t_next`` (see the module docstring); ``noise_level = 0`` is
    :func:`euler_step`. Given ``prev_sample``, its log-probability under the step (the ratio's numerator).
    ``t_max`` (default: ``t_next``, the schedule's second value when ``t = 1`` is its first) stands in for ``t``
    in the std's denominator at ``t = 1``."""
    if noise_level < 0:
        raise ValueError(f"noise_level={noise_level} must be >= 0")
    tt, tn = _times(t, sample), _times(t_next, sample)
    v, x = velocity.double(), sample.double()
    dt = tn - tt
    bound = tn if t_max is None else t_max
    s = flow_sde_std(tt, noise_level, bound) if noise_level > 0 else torch.zeros_like(tt)
    mean = x + (v + s ** 2 / (2 * tt) * (x + (1 - tt) * v)) * dt
    std = s * torch.sqrt(-dt)
    return _finish(mean, std, x - tt * v, generator=generator, prev_sample=prev_sample,
                   compute_log_prob=compute_log_prob and noise_level > 0, reduction=reduction, dtype=sample.dtype)


def cps_step(velocity: torch.Tensor, sample: torch.Tensor, t: torch.Tensor | float, t_next: torch.Tensor | float,
             *, noise_level: float = 0.7, generator: torch.Generator | list[torch.Generator] | None = None,
             prev_sample: torch.Tensor | None = None, compute_log_prob: bool = True,
             reduction: Reduction = "mean") -> StepOutput:
    """Coefficients-preserving sampling from ``t`` to ``t_next``: std ``t' sin(a pi / 2)``, ``a`` in ``[0, 1]``
    (``a = 0``: deterministic DDIM on the flow path, the same as :func:`euler_step`)."""
    if not 0 <= noise_level <= 1:
        raise ValueError(f"noise_level={noise_level} must be in [0, 1] for CPS (the std is t' sin(a pi / 2))")
    tt, tn = _times(t, sample), _times(t_next, sample)
    v, x = velocity.double(), sample.double()
    x0, eps = x - tt * v, x + (1 - tt) * v
    std = tn * math.sin(noise_level * math.pi / 2)
    mean = (1 - tn) * x0 + torch.sqrt(torch.clamp(tn ** 2 - std ** 2, min=0.0)) * eps
    return _finish(mean, std, x0, generator=generator, prev_sample=prev_sample,
                   compute_log_prob=compute_log_prob and noise_level > 0,
                   reduction=reduction, dtype=sample.dtype)
