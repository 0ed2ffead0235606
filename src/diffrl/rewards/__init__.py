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
from diffrl.registry import Registry, positional_parameters
from diffrl.rewards.aesthetic import AestheticScore
from diffrl.rewards.alignment import AlignmentReward
from diffrl.rewards.base import ImageReward, Reward, RewardError
from diffrl.rewards.classifier import classifier as _classifier  # keep diffrl.rewards.classifier the module
from diffrl.rewards.classifier import over50
from diffrl.rewards.clip import clip_score, pickscore
from diffrl.rewards.combine import WeightedSum, combined
from diffrl.rewards.hpsv2 import HPSv2
from diffrl.rewards.imagereward import ImageRewardScore
from diffrl.rewards.jpeg import jpeg_compressibility, jpeg_incompressibility
from diffrl.rewards.openai_vlm import OpenAIVisionReward, VisionJudgeError
from diffrl.rewards.remote import RemoteReward, RemoteRewardError
from diffrl.rewards.scoring import require_differentiable, score

__all__ = [
    "ImageReward",
    "Reward",
    "RewardError",
    "score",
    "require_differentiable",
    "RemoteRewardError",
    "VisionJudgeError",
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


def is_reward_function(target: Any) -> bool:
    """A reference that is already a reward: a function (or callable object) with TRL's signature
    ``reward(images, prompts, prompt_metadata)``; a class (e.g. an :class:`ImageReward` subclass) or a function
    taking options is a factory instead."""
    return not isinstance(target, type) and (positional_parameters(target) or 0) >= 3


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
    "hpsv2": HPSv2,
    "imagereward": ImageRewardScore,
    "classifier": _classifier,
    "over50": over50,
    "alignment": AlignmentReward,
    "remote": RemoteReward,
    "openai_vlm": OpenAIVisionReward,
    "combined": _combined,
}, entry_points="diffrl.rewards", direct=is_reward_function)
"""The reward names ``load`` knows; ``register`` adds one (a factory taking keyword options, a class works);
installed packages add theirs through the ``diffrl.rewards`` entry-point group, and ``load("pkg.mod:name")``
takes a reference to your own reward function or factory."""
_REGISTRY = REWARDS.factories

available = REWARDS.available
register = REWARDS.register
load = REWARDS.load
