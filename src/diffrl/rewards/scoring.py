"""Calling a user's reward function safely: shape, dtype and finiteness checked, errors that name the function.

Every caller (the trainers, training-time evaluation, ``diffrl evaluate``) scores through :func:`score`, so a bad
reward fails the same way everywhere, with :class:`~diffrl.rewards.base.RewardError`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from diffrl.rewards.base import RewardError, reward_name

__all__ = ["require_differentiable", "score"]


def _as_tensor(rewards: Any, name: str, keep_grad: bool) -> torch.Tensor:
    if isinstance(rewards, torch.Tensor):
        values = rewards if keep_grad else rewards.detach()
    else:
        try:
            values = torch.as_tensor(np.asarray(rewards))
        except (TypeError, ValueError) as err:
            raise RewardError(f"reward function {name} returned rewards that are not numbers: {err}") from err
    if values.is_complex():
        raise RewardError(f"reward function {name} returned complex rewards (dtype {values.dtype}); rewards must be "
                          "real numbers — return the real part or the magnitude explicitly.")
    if not (values.is_floating_point() or values.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                           torch.uint8, torch.bool)):
        raise RewardError(f"reward function {name} returned rewards of dtype {values.dtype}; return numbers.")
    return values.float()


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
    values = _as_tensor(rewards, name, keep_grad)
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


def require_differentiable(reward_function: Callable) -> None:
    """Refuse a reward that declares ``differentiable = False`` (JPEG size, a remote server, ...) for reward
    backpropagation: there is nothing to backpropagate. Callables without the attribute are accepted; their
    rewards are checked for a gradient when first scored."""
    if getattr(reward_function, "differentiable", None) is False:
        raise RewardError(
            f"reward '{reward_name(reward_function)}' declares differentiable=False, but AlignProp, DRaFT and ReFL "
            "backpropagate the reward into the model. Use a differentiable reward (computed with torch operations "
            "on the images), or train with DDPOTrainer, which needs only reward values.")
