"""Direct Group Preference Optimization (DGPO; Luo, Hu and Tang, ICLR 2026, arXiv 2510.08425).

Diffusion-DPO (Wallace et al. 2024) lifted from a pair of images to a group: the samples of one prompt are split by
the sign of their advantage into a preferred and a dispreferred set, and the model maximises the likelihood that
the first beats the second under a Bradley-Terry model of group rewards,

    max log sigma(R(G+) - R(G-)),   R(G) = sum_{i in G} |A_i| r_i,   r_i = -beta_d (l_theta,i - l_ref,i),

with Diffusion-DPO's implicit reward ``r`` (the model's denoising loss at a noised copy of the sample, relative to
the reference's). With signed advantages ``R(G+) - R(G-) = -S`` where

    S_g = beta / G * sum_{i in g} A_i (l_theta,i - l_ref,i),

so the loss of a group is ``softplus(S_g) = -log sigma(-S_g)``. It needs only clean samples (deterministic ODE
rollouts) and their advantages. DGPO's released code trains the gradient-equivalent surrogate
``mean_i(sigma(S_g) A_i l_theta,i)``; :func:`dgpo_loss` returns ``mean_g softplus(S_g) / beta``, whose gradient is
exactly that (``d softplus(S)/d theta = sigma(S) beta / G sum A_i grad l_i``) and whose value is the objective. Every
sample of a group is noised with the group's timestep and noise (as DGPO does), so the losses compare like with
like. Written from the paper's equations; the code is this project's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from diffrl.algorithms.grpo import add_kl_term, check_kl_term

__all__ = ["DGPOStats", "dgpo_group_scores", "dgpo_loss"]


class DGPOStats(NamedTuple):
    """Scalar diagnostics of one DGPO loss evaluation (detached)."""

    policy_loss: torch.Tensor
    group_weight: torch.Tensor
    """mean sigma(S_g): 0.5 at the reference, towards 0 once the preferred set is favoured."""
    margin: torch.Tensor
    """mean -S_g: the implicit reward margin of the preferred over the dispreferred set."""
    matching: torch.Tensor
    kl_ref: torch.Tensor


def dgpo_group_scores(matching: torch.Tensor, matching_ref: torch.Tensor, advantages: torch.Tensor,
                      group_size: int, beta: float) -> torch.Tensor:
    """``[B / G]`` ``S_g = beta / G sum_{i in g} A_i (l_theta,i - l_ref,i)`` for consecutive groups of ``group_size``
    (gradients flow through ``matching``)."""
    if matching.ndim != 1 or matching.shape != matching_ref.shape or matching.shape != advantages.shape:
        raise ValueError(f"matching {tuple(matching.shape)}, matching_ref {tuple(matching_ref.shape)} and advantages "
                         f"{tuple(advantages.shape)} must all be [B]")
    if group_size < 2 or matching.shape[0] % group_size:
        raise ValueError(f"a batch of {matching.shape[0]} does not hold whole groups of {group_size} (>= 2)")
    delta = matching - matching_ref.detach()
    terms = advantages.detach().to(delta.dtype) * delta
    return beta / group_size * terms.reshape(-1, group_size).sum(dim=1)


def dgpo_loss(matching: torch.Tensor, matching_ref: torch.Tensor, advantages: torch.Tensor, group_size: int,
              beta: float, *, kl: torch.Tensor | None = None, kl_coef: float = 0.0) -> tuple[torch.Tensor, DGPOStats]:
    """``mean_g softplus(S_g) / beta + kl_coef * mean(kl)`` over the whole groups of the batch.

    Args:
        matching: ``[B]`` the trained model's denoising loss on each noised sample (with gradients).
        matching_ref: ``[B]`` the reference model's at the same ``(x_t, t)``.
        advantages: ``[B]`` the samples' (clipped) group advantages, groups consecutive.
        group_size: ``G``; ``B`` must be a multiple of it.
        beta: DGPO's ``beta_dpo`` (> 0; the paper's SD3.5 runs: 10 to 100).
        kl: ``[B]`` distance of the outputs to the reference (:func:`~diffrl.algorithms.prediction_kl`), or None.
    """
    if beta <= 0:
        raise ValueError(f"dgpo beta={beta} must be > 0")
    check_kl_term(kl, kl_coef, matching.shape, source="prediction_kl")
    scores = dgpo_group_scores(matching, matching_ref, advantages, group_size, beta)
    policy = F.softplus(scores).mean() / beta
    loss, kl_mean = add_kl_term(policy, kl, kl_coef)
    with torch.no_grad():
        stats = DGPOStats(policy.detach(), torch.sigmoid(scores.detach()).mean(), (-scores.detach()).mean(),
                          matching.detach().mean(), kl_mean)
    return loss, stats
