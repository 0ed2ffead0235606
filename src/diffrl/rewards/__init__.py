"""Reward functions and their registry.

Every reward is a callable ``reward(images, prompts, prompt_metadata) -> (rewards, metadata)``
(:class:`Reward`) built by name: ``diffrl.rewards.load("aesthetic", dtype="bfloat16")``.
The same names and options work in configs (``reward: aesthetic``) and on the command
line (``diffrl serve-reward --reward aesthetic --option dtype=bfloat16``). Models load
lazily on the first call, so building a reward is cheap and checks its options only.
See ``docs/rewards.md`` for each reward's model, size and Hub weights.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from diffrl.digits import DigitReward
from diffrl.rewards.aesthetic import AestheticScore
from diffrl.rewards.alignment import AlignmentReward
from diffrl.rewards.base import Reward, RewardError
from diffrl.rewards.classifier import classifier as _classifier  # keep diffrl.rewards.classifier the module
from diffrl.rewards.classifier import over50
from diffrl.rewards.clip import clip_score, pickscore
from diffrl.rewards.combine import WeightedSum, combined
from diffrl.rewards.jpeg import jpeg_compressibility, jpeg_incompressibility
from diffrl.rewards.remote import RemoteReward, RemoteRewardError
from diffrl.rewards.scoring import require_differentiable, score

__all__ = [
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


_REGISTRY: dict[str, RewardFactory] = {
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
}


def available() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_REGISTRY)


def register(name: str, factory: RewardFactory, *, overwrite: bool = False) -> None:
    """Make ``load(name, **options)`` call ``factory(**options)``.

    ``factory`` takes keyword options and returns a :class:`Reward` (a class works).
    Registering a taken name is an error unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise RewardError(f"a reward name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise RewardError(f"the factory for reward '{name}' must be callable, got {factory!r}")
    if name in _REGISTRY and not overwrite:
        raise RewardError(f"reward '{name}' is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def _check_options(name: str, factory: RewardFactory, options: dict[str, Any]) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: let the call report
        return
    parameters = signature.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = [n for n, p in parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for option in options:
        if option not in accepted:
            close = difflib.get_close_matches(option, accepted, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RewardError(
                f"reward '{name}' has no option '{option}'{hint}; its options are: {', '.join(accepted) or 'none'}"
            )
    missing = [n for n in accepted if parameters[n].default is inspect.Parameter.empty and n not in options]
    if missing:
        raise RewardError(f"reward '{name}' needs option(s) {', '.join(missing)}")


def load(name: str, **options: Any) -> Reward:
    """Build the reward registered as ``name`` with ``options`` (checked; models load on first call)."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RewardError(f"unknown reward {name!r}{hint}; known rewards: {', '.join(available())}")
    factory = _REGISTRY[name]
    _check_options(name, factory, options)
    return factory(**options)
