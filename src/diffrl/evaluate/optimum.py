"""The best trade-off possible: the optimum of the KL-regularised objective, estimated from base-model samples.

For ``J(pi) = E_pi[r] - beta KL(pi || pi_ref)`` the maximiser is ``pi*(x) = pi_ref(x) exp(r(x) / beta) / Z``
(e.g. Rafailov et al. 2023, eq. 4; Korbak et al. 2022). Given ``N`` samples ``x_i ~ pi_ref`` and their rewards,
self-normalised importance weights ``w_i = softmax(r / beta)_i`` turn them into estimates under ``pi*`` of the
expected reward, of any per-sample quantity (the target-digit share), of ``KL(pi* || pi_ref) = sum w_i log(N w_i)``
and of the diversity of two independent draws, ``sum_{i != j} w_i w_j d_ij / (1 - sum w_i^2)``. Sweeping ``beta``
draws the frontier: no policy reaches a higher reward at a smaller KL from the base model. The estimates are
as good as the base samples cover ``pi*``: the effective sample size ``1 / sum w_i^2`` is reported beside each.

A trained policy's KL from the base is bounded by its path KL (the data-processing inequality on the denoising
chain): ``KL(pi_theta || pi_ref) <= E sum_t KL(p_theta(x_t' | x_t) || p_ref(x_t' | x_t))``, each step a Gaussian
with the same std, so ``||mu_theta - mu_ref||^2 / (2 sigma^2)`` summed over the dimensions
(:func:`step_kl`); ``E[r] - beta * path KL`` is then a lower bound of the policy's objective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["OptimumPoint", "kl_regularised_optimum", "step_kl"]


class OptimumPoint(NamedTuple):
    """``pi*`` at one ``beta``: its expected reward, target share (``nan`` without an indicator), diversity, KL
    from the base model (nats) and the effective sample size of the estimate."""

    beta: float
    reward: float
    share: float
    diversity: float
    kl: float
    ess: float


def kl_regularised_optimum(rewards: torch.Tensor, features: torch.Tensor, betas: Sequence[float], *,
                           indicator: torch.Tensor | None = None) -> list[OptimumPoint]:
    """The frontier over ``betas`` from ``N`` base samples: ``rewards [N]``, ``features [N, d]`` (pixels, for the
    rms diversity) and an optional ``indicator [N]`` (e.g. "classified as the target digit")."""
    r = rewards.double()
    n = r.shape[0]
    if n < 2 or features.shape[0] != n:
        raise ValueError(f"need at least 2 samples with one feature row each, got {n} rewards and "
                         f"{features.shape[0]} rows")
    flat = features.double().flatten(1)  # rms distance (metrics.diversity's), through cdist: thousands of samples
    distances = torch.cdist(flat, flat) / math.sqrt(flat.shape[1])
    distances.fill_diagonal_(0.0)
    points = []
    for beta in betas:
        if not beta > 0:
            raise ValueError(f"beta={beta} must be > 0")
        w = torch.softmax(r / beta, dim=0)
        w_sq = float((w * w).sum())
        nonzero = w > 0
        kl = float((w[nonzero] * (w[nonzero].log() + math.log(n))).sum())
        diversity = float(w @ distances @ w) / (1.0 - w_sq) if w_sq < 1.0 else 0.0
        share = float((w * indicator.double()).sum()) if indicator is not None else math.nan
        points.append(OptimumPoint(float(beta), float((w * r).sum()), share, diversity, kl, 1.0 / w_sq))
    return points


def step_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """``[B]`` the KL between two Gaussian steps with the same std: ``sum((mu - mu_ref)^2) / (2 std^2)`` over the
    non-batch dimensions (summed, not averaged: the KL of the whole image's step)."""
    std = torch.as_tensor(std, dtype=torch.float64, device=mean.device)
    diff = (mean.double() - mean_ref.double()) ** 2 / (2 * std.double() ** 2)
    return diff.flatten(1).sum(dim=1)
