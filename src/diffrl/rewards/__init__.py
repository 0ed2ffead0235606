"""Reward functions and their registry.

Every reward is a callable ``reward(images, prompts, prompt_metadata) -> (rewards, metadata)``
(:class:`Reward`) built by name: ``diffrl.rewards.load("aesthetic", dtype="bfloat16")``.
The same names and options work in configs (``reward: aesthetic``) and on the command
line (``diffrl serve-reward --reward aesthetic --option dtype=bfloat16``). Models load
lazily on the first call, so building a reward is cheap and checks its options only.
See ``docs/rewards.md`` for each reward's model, size and Hub weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from diffrl.digits import DigitReward
from diffrl.registry import Registry
from diffrl.rewards.aesthetic import AestheticScore
from diffrl.rewards.alignment import AlignmentReward
from diffrl.rewards.base import ImageReward, Reward, RewardError
from diffrl.rewards.classifier import classifier as _classifier  # keep diffrl.rewards.classifier the module
from diffrl.rewards.classifier import over50
from diffrl.rewards.clip import clip_score, pickscore
from diffrl.rewards.combine import WeightedSum, combined
from diffrl.rewards.jpeg import jpeg_compressibility, jpeg_incompressibility
from diffrl.rewards.remote import RemoteReward, RemoteRewardError
from diffrl.rewards.scoring import require_differentiable, score

__all__ = [
    "ImageReward",
    "Reward",
    "RewardError",
    "score",
    "require_differentiable",
    "RemoteRewardError",
    "WeightedSum",
    "available",
    "load",
    "register",
]

RewardFactory = Callable[..., Reward]


def digit(digit: int = 3, kind: str = "log_prob") -> Reward:
    """The offline quickstart's reward: the shipped digit classifier's log-probability (or probability) of
    ``digit`` (see :mod:`diffrl.digits`). Differentiable."""
    reward = DigitReward(target=digit, kind=kind)
    reward.name = "digit"
    return reward


def _combined(*, components: Any) -> WeightedSum:
    """``combined``: a weighted sum of registered rewards (:func:`diffrl.rewards.combine.combined`)."""
    return combined(components=components, load=load)


REWARDS: Registry[Reward] = Registry("reward", "known rewards", RewardError, {
    "digit": digit,
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
    "aesthetic": AestheticScore,
    "clip_score": clip_score,
    "pickscore": pickscore,
    "classifier": _classifier,
    "over50": over50,
    "alignment": AlignmentReward,
    "remote": RemoteReward,
    "combined": _combined,
})
"""The reward names ``load`` knows; ``register`` adds one (a factory taking keyword options, a class works)."""
_REGISTRY = REWARDS.factories

available = REWARDS.available
register = REWARDS.register
load = REWARDS.load
