"""``trl.models.auxiliary_modules.aesthetic_scorer`` under diffrl's name.

TRL 0.23's ``examples/scripts/alignprop.py`` does ``from trl.models.auxiliary_modules import
aesthetic_scorer`` and calls ``aesthetic_scorer(hub_model_id, model_filename)`` for a reward
function ``fn(images, prompts, metadata) -> (scores, {})`` that clamps the images to ``[0, 1]``
and backpropagates through the LAION aesthetic predictor. Here the reward is diffrl's
:class:`~diffrl.rewards.aesthetic.AestheticScore` (differentiable torch preprocessing, the
device of the images instead of TRL's unconditional ``.cuda()``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from diffrl.rewards.aesthetic import DEFAULT_MLP_FILE, DEFAULT_MLP_REPO, AestheticScore

__all__ = ["aesthetic_scorer"]


def aesthetic_scorer(hub_model_id: str = DEFAULT_MLP_REPO, model_filename: str = DEFAULT_MLP_FILE,
                     **options: Any) -> Callable[..., tuple[torch.Tensor, dict]]:
    """TRL's ``aesthetic_scorer``: the differentiable LAION aesthetic reward with the MLP weights
    ``model_filename`` of Hub repo (or local folder) ``hub_model_id``.

    ``options`` go to :class:`~diffrl.rewards.aesthetic.AestheticScore` (``clip_model``,
    ``device``, ``dtype``). The returned callable takes ``(images, prompts, metadata)`` with
    images ``[B, 3, H, W]`` and returns ``(scores [B], {})``; gradients flow to the images.
    """
    reward = AestheticScore(mlp=hub_model_id, mlp_file=model_filename, differentiable=True, **options)

    def score(images: torch.Tensor, prompts: Sequence[str] | None = None,
              metadata: Sequence[Mapping[str, Any]] | None = None) -> tuple[torch.Tensor, dict]:
        return reward(images.clamp(0, 1), prompts, metadata)

    score.differentiable = True  # diffrl's reward protocol: AlignProp checks it
    score.name = reward.name
    score.reward = reward
    return score
