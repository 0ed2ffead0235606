"""DDPO's policy-gradient losses (Black et al. 2023, sec. 4.3), per denoising step."""

from __future__ import annotations

from typing import NamedTuple

import torch


class LossStats(NamedTuple):
    """Scalar diagnostics of one loss evaluation (detached).

    Attributes:
        approx_kl: ``0.5 * mean((logp - logp_old)^2)``, the estimator ddpo-pytorch and TRL log.
        clipfrac: fraction of samples whose ratio left ``[1 - eps, 1 + eps]``.
        ratio: mean importance ratio ``exp(logp - logp_old)``.
    """

    approx_kl: torch.Tensor
    clipfrac: torch.Tensor
    ratio: torch.Tensor


def _stats(log_prob: torch.Tensor, old_log_prob: torch.Tensor, ratio: torch.Tensor, clip_range: float) -> LossStats:
    with torch.no_grad():
        return LossStats(
            approx_kl=0.5 * ((log_prob - old_log_prob) ** 2).mean(),
            clipfrac=((ratio - 1).abs() > clip_range).float().mean(),
            ratio=ratio.mean(),
        )


def ppo_clip_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, LossStats]:
    """DDPO-IS: PPO's clipped surrogate (Schulman et al. 2017, eq. 7) on one step's transitions.

    ``loss = mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))`` with ``r = exp(logp - logp_old)``.
    All inputs are ``[B]``; ``advantages`` should already be clipped.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    return loss, _stats(log_prob, old_log_prob, ratio, clip_range)


def reinforce_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float = 0.0
) -> tuple[torch.Tensor, LossStats]:
    """DDPO-SF: the score-function (REINFORCE) estimator, ``loss = -mean(A logp)`` (Williams 1992).

    On-policy: valid for one update per sample batch (the recipe enforces it). ``old_log_prob`` only
    feeds the diagnostics.
    """
    loss = -(advantages * log_prob).mean()
    ratio = torch.exp(log_prob.detach() - old_log_prob)
    return loss, _stats(log_prob.detach(), old_log_prob, ratio, clip_range)
