"""Reward-weighted regression baselines of the DDPO paper (Black et al. 2023, sec. 4.2; Lee et al. 2023)."""

from __future__ import annotations

import torch


def rwr_weights(rewards: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(r / temperature)`` over the batch, scaled by the batch size so the mean weight is 1."""
    if temperature <= 0:
        raise ValueError(f"rwr temperature={temperature} must be > 0.")
    return torch.softmax(rewards.float() / temperature, dim=0) * rewards.numel()


def rwr_sparse_weights(rewards: torch.Tensor, percentile: float) -> torch.Tensor:
    """1 for samples whose reward is at or above the ``percentile`` (0-100) of the batch, else 0,
    rescaled so the kept samples' weights average to 1 over the batch."""
    if not 0 <= percentile < 100:
        raise ValueError(f"rwr_sparse percentile={percentile} must be in [0, 100).")
    threshold = torch.quantile(rewards.float(), percentile / 100.0)
    keep = (rewards >= threshold).float()
    return keep * rewards.numel() / keep.sum().clamp(min=1)


def denoising_loss(model_output: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted diffusion loss ``mean_i w_i ||target_i - model_output_i||^2 / D`` (Ho et al. 2020, eq. 14).

    ``model_output``/``target``: ``[B, *S]`` (noise for epsilon-prediction, velocity for v-prediction);
    ``weights``: ``[B]``.
    """
    per_sample = ((model_output.float() - target.float()) ** 2).mean(dim=tuple(range(1, model_output.ndim)))
    return (weights * per_sample).mean()
