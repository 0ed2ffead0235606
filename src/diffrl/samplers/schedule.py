"""Timestep bookkeeping shared by the step functions: which ``t'`` follows ``t``, and ``abar`` at both."""

from __future__ import annotations

import torch


def previous_timesteps(timesteps: torch.Tensor, num_train_timesteps: int, num_inference_steps: int) -> torch.Tensor:
    """``t' = max(t - T // N, 0)`` for each entry of ``timesteps``.

    The same rule as diffusers' ``DDIMScheduler.step`` (``T // N`` whatever the timestep spacing), with the
    clamp at 0 that ddpo-pytorch and TRL apply: the final step of a chain that ends at ``t >= 1`` goes to
    ``t' = 0``, i.e. to ``abar_0 = alphas_cumprod[0]`` (about 0.9999), never to ``final_alpha_cumprod = 1``.
    That keeps every transition, the last one included, a Gaussian with non-zero variance
    (identical to diffusers with ``set_alpha_to_one=False``). A chain whose last timestep is 0 ends in
    a zero-variance step; the policies avoid it by sampling with ``steps_offset >= 1``.
    """
    return (timesteps - num_train_timesteps // num_inference_steps).clamp(min=0)


def alphas_at(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, prev_timesteps: torch.Tensor, ndim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(abar_t, abar_t')`` gathered per sample and shaped ``[B, 1, ..., 1]`` for a ``ndim``-dim sample.

    ``timesteps`` may be a scalar (one timestep for the whole batch) or ``[B]``.
    """
    device = timesteps.device
    table = alphas_cumprod.to(device=device, dtype=torch.float32)
    a_t = table[timesteps.long()]
    a_prev = table[prev_timesteps.long()]
    shape = (-1,) + (1,) * (ndim - 1)
    if a_t.ndim == 0:
        return a_t, a_prev
    return a_t.reshape(shape), a_prev.reshape(shape)
