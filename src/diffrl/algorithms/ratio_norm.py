"""GRPO-Guard's RatioNorm and step reweighting (Wang et al. 2025, arXiv 2510.22319): PPO's clip on a re-centred,
step-consistent importance ratio.

For a stochastic step ``x' = mu_old + s z`` (``z ~ N(0, I)``, std ``s`` independent of the weights) the log-ratio
of the trained step ``mu_theta = mu_old + d`` is, mean-reduced over the ``D`` dimensions as every log-probability
here::

    log r = mean(z d) / s - mean(d^2) / (2 s^2)

Its mean over draws is ``-KL < 0`` (the "left shift": the ratio of a moved policy sits below 1, so PPO's one-sided
clip rarely stops a positive-advantage sample) and its spread ``||d|| / s`` grows as the step's noise shrinks (the
late, low-noise steps dominate). RatioNorm (the paper's Eq. 8, as in its authors' Flow-GRPO script) adds the KL back
and scales by ``s``::

    log r_norm = (log r + KL_old) * s = mean(z d)        KL_old = mean(d^2) / (2 s^2)

zero-mean, and independent of ``s``; its gradient with respect to the step mean is ``z / D`` whatever ``d``.
The mean still moves with the network output by a step-dependent gain (``|dt|`` on a flow-matching Euler step),
so the paper's gradient reweighting divides each step's loss by it (1/dt in the authors' script):
``weight = 1 / gain`` from the schedule's :meth:`output_gain`. On UNets the gain is that of the DDIM ODE step.

Pure tensor functions; the GRPO and DDPO-IS recipes call them with the recorded sampling means.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["RatioNormStats", "normalised_log_ratio", "ratio_norm_loss", "row_inputs", "step_std"]


class RatioNormStats(NamedTuple):
    """Scalar diagnostics of one RatioNorm loss evaluation (detached)."""

    approx_kl: torch.Tensor
    """``0.5 * mean(log r^2)`` of the raw ratio, as DDPO's."""
    clipfrac: torch.Tensor
    """fraction of normalised ratios outside ``[1 - eps, 1 + eps]``."""
    ratio: torch.Tensor
    """mean normalised ratio."""
    raw_ratio: torch.Tensor
    """mean raw ratio ``exp(log r)`` (below 1 once the weights move: the shift RatioNorm removes)."""
    policy_loss: torch.Tensor
    kl_old: torch.Tensor
    """mean exact step KL to the sampling policy (the bias added back)."""


def step_std(std: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B]`` per-sample standard deviation from a step's ``[B, 1, ..., 1]`` (or broadcastable) ``std``."""
    return std.reshape(std.shape[0], -1)[:, 0].expand(batch) if std.ndim else std.expand(batch)


def row_inputs(std: torch.Tensor, gain: torch.Tensor | None,
               batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``([B] step stds, [B] weights 1 / gain or None)`` for :func:`ratio_norm_loss` from a step's ``[B, 1, ...]``
    (or broadcastable) std and the schedule's ``output_gain`` of the ``B`` rows (``None``: no reweighting)."""
    rows = step_std(std, batch)
    return rows, None if gain is None else 1.0 / gain.to(rows.device)


def normalised_log_ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor, kl_old: torch.Tensor,
                         std: torch.Tensor) -> torch.Tensor:
    """``(log_prob - old_log_prob + kl_old) * std``, all ``[B]`` (see the module docstring); ``old_log_prob`` is
    data (detached), ``kl_old`` keeps its gradient (through the trained mean). A deterministic row (std 0, KL 0:
    :func:`~diffrl.algorithms.trust_region.kl_to_sampling`) gets 0: ratio 1, no gradient."""
    if not log_prob.shape == old_log_prob.shape == kl_old.shape == std.shape:
        raise ValueError(f"log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)}, kl_old "
                         f"{tuple(kl_old.shape)} and std {tuple(std.shape)} must all be [B]")
    if bool((std < 0).any()):
        raise ValueError("a step's standard deviation must be >= 0")
    return (log_prob - old_log_prob.detach() + kl_old) * std.detach()


def ratio_norm_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                    kl_old: torch.Tensor, std: torch.Tensor, clip_range: float,
                    weight: torch.Tensor | None = None) -> tuple[torch.Tensor, RatioNormStats]:
    """PPO's clipped surrogate on the normalised ratio, each row's term times ``weight`` (the step reweighting;
    ``None``: 1), averaged over the rows.

    Args:
        log_prob: ``[B]`` log-probabilities of the recorded transitions under the trained weights (with gradients).
        old_log_prob: ``[B]`` the same under the sampling weights (recorded).
        advantages: ``[B]``, already clipped.
        kl_old: ``[B]`` exact step KL to the sampling policy's recorded means, with gradients
            (:func:`~diffrl.algorithms.grpo.gaussian_mean_kl`).
        std: ``[B]`` each row's step standard deviation (:func:`step_std`).
        clip_range: PPO's ``eps``.
        weight: ``[B]`` per-row loss weights (``1 / output_gain`` for GRPO-Guard's reweighting).
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range={clip_range} must be > 0.")
    if weight is not None and weight.shape != log_prob.shape:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected {tuple(log_prob.shape)}")
    ratio = torch.exp(normalised_log_ratio(log_prob, old_log_prob, kl_old, std))
    adv = advantages.detach().to(ratio.dtype)
    per_row = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range))
    if weight is not None:
        per_row = per_row * weight.detach().to(per_row.dtype)
    loss = per_row.mean()
    with torch.no_grad():
        diff = log_prob.detach() - old_log_prob.detach()
        stats = RatioNormStats(0.5 * (diff**2).mean(), ((ratio - 1).abs() > clip_range).float().mean(),
                               ratio.detach().mean(), diff.exp().mean(), loss.detach(), kl_old.detach().mean())
    return loss, stats
