"""Advantage Weighted Matching (Xue et al. 2025, arXiv 2509.25050): RL on the model's own pretraining loss.

The policy samples clean images; each is scored, its group advantage ``A`` computed as in GRPO, and the model
is trained with its ordinary denoising loss on freshly noised copies of its own samples, weighted by ``A``:

    L = E[ A * w(l_theta) ],   l_theta = ||f_theta(x_t, t) - target||^2 / D

(``target`` is the noise, the velocity or ``x0``, whatever the model predicts; the paper's flow-matching target
``eps - x0`` is the velocity case). Minimising it lowers the denoising loss, that is raises the ELBO-based
likelihood, of samples that beat their group and lowers it for the others: the policy gradient with the
log-likelihood replaced by its ELBO surrogate ``-l``. ``w`` is the identity (``uniform``) or a generalized
Huber ``w(l) = ((l + c)^p - c^p) / p`` that damps large errors (the weighting Flow-Factory's AWM offers).

Stabilisation, optional: a PPO-style clip of the surrogate ratio ``exp(w(l_old) - w(l_theta))`` against the
policy that sampled (the ratio is 1 at the first update of an epoch, where the clipped and plain objectives have
the same gradient), a squared distance of the raw outputs to that policy (``kl_old``) and to the frozen
reference (``kl_ref``, NFT's form).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

__all__ = ["AWMStats", "AWMWeighting", "awm_loss", "matching_loss", "weighted_matching"]

AWMWeighting = Literal["uniform", "ghuber"]
GHUBER_EPS = 1e-3
"""``c`` of the generalized Huber weighting: keeps its gradient finite at a zero error."""


def matching_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[B]`` the per-sample denoising loss ``mean((output - target)^2)`` over the non-batch dimensions, float32."""
    dims = tuple(range(1, output.ndim))
    return ((output.float() - target.float()) ** 2).mean(dim=dims)


def weighted_matching(loss: torch.Tensor, weighting: AWMWeighting, power: float = 0.25) -> torch.Tensor:
    """``w(l)``: ``l`` itself, or the generalized Huber ``((l + c)^p - c^p) / p`` (``p = power``)."""
    if weighting == "uniform":
        return loss
    if weighting == "ghuber":
        if not 0 < power <= 1:
            raise ValueError(f"ghuber power={power} must be in (0, 1]")
        return ((loss + GHUBER_EPS) ** power - GHUBER_EPS ** power) / power
    raise ValueError(f"unknown AWM weighting {weighting!r}: use 'uniform' or 'ghuber'")


class AWMStats(NamedTuple):
    """Scalar diagnostics of one AWM loss evaluation (detached)."""

    policy_loss: torch.Tensor
    matching: torch.Tensor
    ratio: torch.Tensor
    clipfrac: torch.Tensor
    kl_old: torch.Tensor
    kl_ref: torch.Tensor


def awm_loss(w_theta: torch.Tensor, w_old: torch.Tensor, advantages: torch.Tensor, clip_range: float, *,
             kl_old: torch.Tensor | None = None, kl_old_coef: float = 0.0, kl_ref: torch.Tensor | None = None,
             kl_ref_coef: float = 0.0, matching: torch.Tensor | None = None) -> tuple[torch.Tensor, AWMStats]:
    """The AWM loss of ``[B]`` weighted matching losses under the trained weights (``w_theta``, with gradients)
    and the sampling policy (``w_old``), for ``[B]`` advantages.

    ``clip_range = 0``: ``mean(A w_theta)``. ``clip_range > 0``: PPO's ``mean(max(-A r, -A clip(r, 1 - c, 1 + c)))``
    with ``r = exp(w_old - w_theta)``; at ``r = 1`` both have the gradient ``mean(A grad w_theta)``. Plus
    ``kl_old_coef * mean(kl_old)`` and ``kl_ref_coef * mean(kl_ref)``.
    """
    advantages = advantages.to(w_theta.dtype)
    log_ratio = w_old.detach() - w_theta
    ratio = torch.exp(log_ratio)
    if clip_range > 0:
        unclipped = -advantages * ratio
        clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
        policy = torch.maximum(unclipped, clipped).mean()
        clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean()
    else:
        policy = (advantages * w_theta).mean()
        clipfrac = torch.zeros((), device=w_theta.device)
    total = policy
    zero = torch.zeros((), device=w_theta.device)
    if kl_old is not None and kl_old_coef > 0:
        total = total + kl_old_coef * kl_old.mean()
    if kl_ref is not None and kl_ref_coef > 0:
        total = total + kl_ref_coef * kl_ref.mean()
    stats = AWMStats(policy.detach(), (matching if matching is not None else w_theta).detach().mean(),
                     ratio.detach().mean(), clipfrac.detach(),
                     kl_old.detach().mean() if kl_old is not None else zero,
                     kl_ref.detach().mean() if kl_ref is not None else zero)
    return total, stats
