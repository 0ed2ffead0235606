"""An exact KL trust region around the sampling policy, instead of PPO's ratio clipping (Flow-DPPO, arXiv
2606.11025).

Every stochastic step of a diffusion sampler is a Gaussian whose std does not depend on the weights, so the KL
between the step that sampled (mean ``mu_old``) and the trained one (``mu_theta``) is exact and closed-form:
``KL = ||mu_old - mu_theta||^2 / (2 sigma^2)`` (mean-reduced over the sample's dimensions, as every log-probability
here: :func:`~diffrl.algorithms.grpo.gaussian_mean_kl`). It is 0 on a freshly sampled trajectory and grows as the
weights move, whatever the sampled noise, where the ratio ``exp(logp_theta - logp_old)`` of one draw is a noisy
one-sample view of it. Two ways to use it:

- ``kl_penalty``: ``-A * ratio + coef * KL`` (no clipping);
- ``kl_mask``: ``-A * ratio``, with the gradient of a step stopped where ``KL > max_kl`` and the ratio has already
  moved the way the advantage pushes (``A * (ratio - 1) > 0``; PPO's clip is one-sided the same way).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from diffrl.algorithms.grpo import gaussian_mean_kl

__all__ = ["TRUST_REGIONS", "TrustRegion", "TrustRegionStats", "kl_to_sampling", "trust_region_loss"]

TrustRegion = Literal["clip", "kl_penalty", "kl_mask"]
TRUST_REGIONS: tuple[str, ...] = ("clip", "kl_penalty", "kl_mask")


def kl_to_sampling(mean: torch.Tensor, sampling_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``[B]`` exact KL of each trained step to the recorded sampling step (:func:`gaussian_mean_kl`, with gradients
    through ``mean``); 0 on deterministic rows (std 0: CPS's last step, whose log-probability is 0 by convention)."""
    stochastic = std > 0
    kl = gaussian_mean_kl(mean, sampling_mean, torch.where(stochastic, std, torch.ones_like(std)))
    return torch.where(stochastic.reshape(std.shape[0], -1)[:, 0], kl, torch.zeros_like(kl))


class TrustRegionStats(NamedTuple):
    """Scalar diagnostics of one trust-region loss evaluation (detached)."""

    approx_kl: torch.Tensor
    ratio: torch.Tensor
    policy_loss: torch.Tensor
    kl_old: torch.Tensor
    masked: torch.Tensor
    """fraction of samples whose gradient the mask stopped (0 for the penalty)."""


def trust_region_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      kl_old: torch.Tensor, mode: TrustRegion, *, coef: float = 1.0,
                      max_kl: float = 1e-3) -> tuple[torch.Tensor, TrustRegionStats]:
    """One step's policy loss under a KL trust region (see the module docstring).

    Args:
        log_prob: ``[B]`` log-probabilities of the recorded transitions under the trained weights (with gradients).
        old_log_prob: ``[B]`` the same under the sampling weights (recorded).
        advantages: ``[B]``.
        kl_old: ``[B]`` the exact step KL to the sampling policy (with gradients for the penalty).
        mode: "kl_penalty" or "kl_mask".
        coef: the penalty's weight. max_kl: the mask's threshold, in the same mean-reduced units.
    """
    if mode not in ("kl_penalty", "kl_mask"):
        raise ValueError(f"trust region {mode!r}: use 'kl_penalty' or 'kl_mask' ('clip' is ppo_clip_loss)")
    if not log_prob.shape == old_log_prob.shape == advantages.shape == kl_old.shape:
        raise ValueError(f"log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)}, advantages "
                         f"{tuple(advantages.shape)} and kl_old {tuple(kl_old.shape)} must all be [B]")
    diff = log_prob - old_log_prob.detach()
    ratio = torch.exp(diff)
    adv = advantages.detach().to(ratio.dtype)
    surrogate = -adv * ratio
    if mode == "kl_penalty":
        masked = torch.zeros((), device=ratio.device)
        policy = surrogate.mean() + coef * kl_old.mean()
    else:
        outside = (kl_old.detach() > max_kl) & (adv * (ratio.detach() - 1) > 0)
        masked = outside.float().mean()
        policy = torch.where(outside, surrogate.detach(), surrogate).mean()
    with torch.no_grad():
        stats = TrustRegionStats(0.5 * (diff.detach() ** 2).mean(), ratio.detach().mean(),
                                 surrogate.detach().mean(), kl_old.detach().mean(), masked)
    return policy, stats
