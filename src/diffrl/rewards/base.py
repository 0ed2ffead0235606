"""The reward protocol and the checks every reward shares.

A reward is any callable with TRL's signature (``DDPOTrainer``'s ``reward_function``):
``reward(images, prompts, prompt_metadata) -> (rewards, metadata)`` where ``images``
is a float tensor ``[B, 3, H, W]`` in ``[0, 1]`` on any device and ``rewards`` is a
float32 tensor ``[B]`` on the same device. A reward also says whether gradients flow
from ``rewards`` back to ``images`` (``differentiable``), which the reward-backprop
recipes (AlignProp, DRaFT, ReFL) require.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "ImageReward",
    "PromptMetadata",
    "Prompts",
    "Reward",
    "RewardOutput",
    "RewardError",
    "check_images",
    "check_prompts",
    "resolve_dtype",
    "resolve_device",
    "check_positive",
    "check_choice",
    "as_float_rewards",
    "reward_name",
]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class RewardError(ValueError):
    """Bad input to, or bad configuration of, a reward; the message names the reward and the fix."""


Prompts = Sequence[str] | None
"""One prompt per image, or None (the rewards that ignore prompts accept None)."""
PromptMetadata = Sequence[Mapping[str, Any]] | None
"""One metadata mapping per image (from the prompt source), or None."""
RewardOutput = tuple[torch.Tensor, dict[str, Any]]
"""``(rewards [B] float32 on the images' device, metadata)``."""


@runtime_checkable
class Reward(Protocol):
    """A batched reward function (the TRL ``reward_function`` signature)."""

    name: str
    """The registry name, used to namespace logged metrics (``reward/<name>``)."""
    differentiable: bool
    """True when gradients flow from the rewards back to the input images."""

    def __call__(self, images: torch.Tensor, prompts: Prompts = None, prompt_metadata: PromptMetadata = None
                 ) -> RewardOutput:
        """Score ``images`` ``[B, 3, H, W]`` in ``[0, 1]``; return ``(rewards [B] float32, metadata)``."""
        ...


class ImageReward:
    """What diffrl's own rewards share: ``__call__`` checks the inputs, then calls :meth:`score_images`.

    A subclass sets ``name`` and ``differentiable``, sets ``needs_prompts`` when it reads the prompts (they
    then arrive as a checked list of one string per image), and implements :meth:`score_images` only.
    """

    name: str
    differentiable: bool
    needs_prompts: bool = False

    def __call__(self, images: torch.Tensor, prompts: Prompts = None, prompt_metadata: PromptMetadata = None
                 ) -> RewardOutput:
        check_images(images, self.name)
        if self.needs_prompts:
            prompts = check_prompts(prompts, images.shape[0], self.name)
        return self.score_images(images, prompts, prompt_metadata)

    def score_images(self, images: torch.Tensor, prompts: Prompts, prompt_metadata: PromptMetadata) -> RewardOutput:
        """Score checked images (finite, ``[B, 3, H, W]`` in ``[0, 1]``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement score_images")


def check_images(images: Any, reward: str) -> None:
    """Raise a :class:`RewardError` unless ``images`` is a finite float ``[B, 3, H, W]`` tensor in ``[0, 1]``.

    The range check catches the classic mistake of passing a diffusion model's raw
    ``[-1, 1]`` output (ddpo-celebahq's JPEG reward silently clipped half the range).
    """
    if not isinstance(images, torch.Tensor):
        raise RewardError(
            f"reward '{reward}' expects images as a torch.Tensor [B, 3, H, W], got {type(images).__name__}"
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise RewardError(
            f"reward '{reward}' expects images of shape [B, 3, H, W] (RGB, channels first), got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise RewardError(
            f"reward '{reward}' expects float images in [0, 1], got dtype {images.dtype}; "
            "convert uint8 images with images.float() / 255"
        )
    if images.shape[0] == 0:
        raise RewardError(f"reward '{reward}' got an empty batch (shape {tuple(images.shape)})")
    with torch.no_grad():
        low, high = images.min().item(), images.max().item()
    if not (math.isfinite(low) and math.isfinite(high)):
        raise RewardError(f"reward '{reward}' got non-finite pixel values (min {low}, max {high})")
    if low < 0.0 or high > 1.0:
        raise RewardError(
            f"reward '{reward}' expects images in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
            "if they are a diffusion model's [-1, 1] output, pass (images / 2 + 0.5).clamp(0, 1)"
        )


def check_prompts(prompts: Sequence[str] | None, batch_size: int, reward: str) -> list[str]:
    """Return ``prompts`` as a list of ``batch_size`` strings, or raise naming the reward."""
    if prompts is None:
        raise RewardError(f"reward '{reward}' scores images against their prompts; pass prompts (one per image)")
    if isinstance(prompts, str):
        raise RewardError(f"reward '{reward}' expects a sequence of prompts, one per image, got a single string")
    prompts = list(prompts)
    if len(prompts) != batch_size:
        raise RewardError(f"reward '{reward}' got {len(prompts)} prompts for {batch_size} images; pass one per image")
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise RewardError(f"reward '{reward}' expects prompts to be strings, got {type(prompt).__name__}")
    return prompts


def resolve_dtype(value: str | torch.dtype | None, *, reward: str, setting: str = "dtype") -> torch.dtype | None:
    """Parse a dtype option (``"bfloat16"``, ``"fp16"``, a ``torch.dtype`` or None)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.lower() in _DTYPES:
        return _DTYPES[value.lower()]
    raise RewardError(
        f"reward '{reward}': option {setting}={value!r} is not a dtype; use one of {sorted(set(_DTYPES))} "
        "or leave it unset to follow the images' dtype"
    )


def resolve_device(value: str | torch.device | None, *, reward: str) -> torch.device | None:
    """Parse a device option (``"cuda:1"``, ``"cpu"`` or None to follow the images)."""
    if value is None or isinstance(value, torch.device):
        return value
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise RewardError(
            f"reward '{reward}': option device={value!r} is not a torch device ({error}); "
            "use e.g. 'cuda:0' or 'cpu', or leave it unset to follow the images"
        ) from None


def check_positive(value: Any, *, reward: str, setting: str, integer: bool = False, allow_zero: bool = False) -> None:
    """Raise unless ``value`` is a positive (or non-negative) number, naming the option."""
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        what = "integer" if integer else "number"
        bound = ">= 0" if allow_zero else "> 0"
        raise RewardError(f"reward '{reward}': option {setting}={value!r} must be a {what} {bound}")


def check_choice(value: Any, choices: Sequence[str], *, reward: str, setting: str) -> None:
    """Raise unless ``value`` is one of ``choices``, naming the option."""
    if value not in choices:
        raise RewardError(f"reward '{reward}': option {setting}={value!r} must be one of {list(choices)}")


def as_float_rewards(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rewards as float32 ``[B]`` on ``device`` (keeps the autograd graph)."""
    return values.reshape(-1).to(device=device, dtype=torch.float32)


def reward_name(reward: Any) -> str:
    """``reward.name``; for callables that do not set one, the function's qualified name or the class name."""
    return str(getattr(reward, "name", None) or getattr(reward, "__qualname__", None) or type(reward).__name__)
