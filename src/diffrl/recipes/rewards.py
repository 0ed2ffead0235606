"""Calling user reward functions safely: shape, dtype and finiteness checked, errors that name the function."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch


class RewardError(ValueError):
    """A reward function returned something the trainer cannot use."""


def reward_name(fn: Callable) -> str:
    return getattr(fn, "name", None) or getattr(fn, "__qualname__", None) or type(fn).__name__


def score(fn: Callable, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Any],
          *, keep_grad: bool = False) -> tuple[torch.Tensor, Any]:
    """Call ``fn(images, prompts, metadata) -> (rewards, reward_metadata)`` and check the result.

    Returns rewards as a float32 tensor ``[B]`` (on CPU unless ``keep_grad``, where the graph is kept).
    """
    result = fn(images, list(prompts), list(metadata))
    name = reward_name(fn)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise RewardError(f"reward function {name} must return (rewards, metadata); it returned {type(result).__name__}.")
    rewards, reward_metadata = result
    if isinstance(rewards, torch.Tensor):
        values = rewards if keep_grad else rewards.detach()
        values = values.float()
    else:
        try:
            values = torch.as_tensor(np.asarray(rewards, dtype=np.float32))
        except (TypeError, ValueError) as err:
            raise RewardError(f"reward function {name} returned rewards that are not numbers: {err}") from err
    batch = images.shape[0]
    if tuple(values.shape) != (batch,):
        raise RewardError(f"reward function {name} returned rewards of shape {tuple(values.shape)} for {batch} "
                          f"images; it must return one number per image, shape ({batch},).")
    bad = ~torch.isfinite(values.detach())
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        shown = [float(values[i]) for i in idx[:5]]
        raise RewardError(f"reward function {name} returned non-finite rewards {shown} at indices {idx[:5]} "
                          f"(prompts {[prompts[i] for i in idx[:3]]}); rewards must be finite numbers.")
    if keep_grad and not values.requires_grad:
        raise RewardError(f"reward function {name} returned rewards without gradients; reward backpropagation "
                          "needs a differentiable reward computed with torch operations on the images.")
    return (values if keep_grad else values.cpu()), reward_metadata
