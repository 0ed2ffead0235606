"""A weighted sum of rewards, each component kept in the metadata for logging."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from diffrl.rewards.base import ImageReward, PromptMetadata, Prompts, Reward, RewardError, RewardOutput, reward_name

__all__ = ["WeightedSum", "combined"]


class WeightedSum(ImageReward):
    """``sum_k weight_k * reward_k(images, prompts, metadata)``.

    Differentiable only if every component is. Metadata: ``components`` maps each key to
    its unweighted rewards ``[B]`` (detached), ``weights`` to its weight, and
    ``metadata`` to the component's own metadata.
    """

    name = "combined"

    def __init__(self, components: Sequence[tuple[str, Reward, float]]) -> None:
        if not components:
            raise RewardError("reward 'combined': option components is empty; give at least one reward")
        keys = [key for key, _, _ in components]
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            raise RewardError(
                f"reward 'combined': components {duplicates} appear more than once; give each a distinct 'key'"
            )
        self.components = list(components)
        self.differentiable = all(reward.differentiable for _, reward, _ in self.components)

    def score_images(self, images: torch.Tensor, prompts: Prompts, prompt_metadata: PromptMetadata) -> RewardOutput:
        total: torch.Tensor | None = None
        parts: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        metadata: dict[str, Any] = {}
        for key, reward, weight in self.components:
            values, metadata[key] = reward(images, prompts, prompt_metadata)
            values = values.to(device=images.device, dtype=torch.float32)
            parts[key], weights[key] = values.detach(), weight
            total = weight * values if total is None else total + weight * values
        return total, {"components": parts, "weights": weights, "metadata": metadata}


def _component(entry: Any, index: int, load: Callable[..., Reward]) -> tuple[str, Reward, float]:
    if isinstance(entry, (tuple, list)) and len(entry) == 2:
        entry = {"reward": entry[0], "weight": entry[1]}
    if not isinstance(entry, Mapping):
        raise RewardError(
            f"reward 'combined': components[{index}]={entry!r} must be a mapping "
            "{reward: NAME, weight: W, options: {...}, key: NAME} or a (reward, weight) pair"
        )
    unknown = sorted(set(entry) - {"reward", "weight", "options", "key"})
    if unknown:
        raise RewardError(
            f"reward 'combined': components[{index}] has unknown field(s) {unknown}; use reward, weight, options, key"
        )
    if "reward" not in entry:
        raise RewardError(f"reward 'combined': components[{index}] needs a 'reward' (a registered name or a reward)")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise RewardError(f"reward 'combined': components[{index}] weight={weight!r} must be a number")
    reward = entry["reward"]
    options = entry.get("options") or {}
    if isinstance(reward, str):
        if not isinstance(options, Mapping):
            raise RewardError(f"reward 'combined': components[{index}] options={options!r} must be a mapping")
        reward = load(reward, **options)
    elif options:
        raise RewardError(f"reward 'combined': components[{index}] gives options for an already built reward")
    if not callable(reward) or not isinstance(getattr(reward, "differentiable", None), bool):
        raise RewardError(
            f"reward 'combined': components[{index}] reward={reward!r} is not a reward "
            "(a callable with a boolean 'differentiable')"
        )
    return str(entry.get("key", reward_name(reward))), reward, float(weight)


def combined(*, components: Sequence[Any], load: Callable[..., Reward]) -> WeightedSum:
    """Weighted sum of ``components``: mappings ``{reward, weight=1, options={}, key=reward name}`` or pairs;
    ``load(name, **options)`` builds the components given by name (the registry passes its own).

    Example: ``load("combined", components=[{"reward": "aesthetic", "weight": 1.0},
    {"reward": "jpeg_compressibility", "weight": 0.05}])``.
    """
    if isinstance(components, (str, Mapping)) or not isinstance(components, Sequence):
        raise RewardError(f"reward 'combined': option components={components!r} must be a list of components")
    return WeightedSum([_component(entry, index, load) for index, entry in enumerate(components)])
