"""Log-density of a diagonal Gaussian, reduced the way DDPO's references reduce it."""

from __future__ import annotations

import math
from typing import Literal

import torch

Reduction = Literal["mean", "sum"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class DeterministicStepError(ValueError):
    """A log-probability was asked of a transition whose standard deviation is zero (``eta = 0``)."""


def gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: Reduction = "mean"
) -> torch.Tensor:
    """``log N(x; mean, std^2)`` per element, reduced over every non-batch dimension.

    ``log p = -(x - mean)^2 / (2 std^2) - log(std) - log(sqrt(2 pi))``.

    ``reduction="mean"`` (the default) averages over the non-batch dimensions, as
    ddpo-pytorch and TRL do: the result is the per-dimension log-density, so the
    importance ratio ``exp(logp - logp_old)`` is a geometric mean of per-pixel ratios
    and stays close to 1 — the reason their PPO clip range is as small as ``1e-4``.
    ``"sum"`` gives the true joint log-density of the whole sample.

    The computation runs in float32 (or float64 if given) whatever the input dtype, since
    squared differences of half-precision latents lose the digits the ratio depends on.

    Raises:
        DeterministicStepError: if any ``std`` is zero (a deterministic, ``eta = 0`` step has
            no density; sample with ``eta > 0`` to train with log-probabilities).
    """
    if bool((std <= 0).any()):
        raise DeterministicStepError(
            "log-probability requested for a deterministic step (standard deviation 0): "
            "eta = 0 gives a DDIM step with no noise, so there is no density to evaluate. "
            "Use eta > 0 (DDPO uses eta = 1.0) when log-probabilities are needed."
        )
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    x, mean, std = x.to(compute_dtype), mean.to(compute_dtype), std.to(compute_dtype)
    return reduce_per_sample(-((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI, reduction)


def reduce_per_sample(elementwise: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """``[B, *S] -> [B]``: the mean (``"mean"``, per dimension) or the sum (``"sum"``, whole sample) over every
    non-batch dimension."""
    dims = tuple(range(1, elementwise.ndim))
    if reduction == "mean":
        return elementwise.mean(dim=dims)
    if reduction == "sum":
        return elementwise.sum(dim=dims)
    raise ValueError(f"reduction={reduction!r} is not supported; use 'mean' or 'sum'.")
