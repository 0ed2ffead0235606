"""Loading transformers models once, lazily, onto the device and dtype the caller uses."""

from __future__ import annotations

from typing import Any

import torch

from diffrl.rewards.base import ImageReward, RewardError, resolve_device, resolve_dtype


def from_pretrained(cls: Any, name_or_path: str, *, reward: str, setting: str, dtype: torch.dtype | None = None) -> Any:
    """``cls.from_pretrained(name_or_path)`` in ``dtype``, with an error that names the option on failure.

    The dtype is passed at load time (not cast afterwards) so that a 7B model in
    bfloat16 never exists in float32 in host memory.
    """
    import transformers
    from packaging.version import Version

    kwargs: dict[str, Any] = {}
    if dtype is not None:
        # transformers renamed ``torch_dtype`` to ``dtype`` in 4.56.
        key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        kwargs[key] = dtype
    try:
        return cls.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        raise RewardError(
            f"reward '{reward}': could not load option {setting}={name_or_path!r} with {cls.__name__} ({error}). "
            "Give a Hub id you can download, or a local directory written by save_pretrained"
        ) from error


class ModelReward(ImageReward):
    """An :class:`~diffrl.rewards.base.ImageReward` whose models load once, on the first call.

    ``device``/``dtype`` options (checked when the reward is built) say where the models run; left unset they
    follow the images. A subclass sets ``name`` before calling ``__init__``, implements ``_load(dtype)`` and
    starts :meth:`score_images` with ``device, dtype = self._prepare(images)``.
    """

    def __init__(self, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> None:
        self.device = resolve_device(device, reward=self.name)
        self.dtype = resolve_dtype(dtype, reward=self.name)
        self._loaded = False

    def _load(self, dtype: torch.dtype) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _load")

    def _prepare(self, images: torch.Tensor) -> tuple[torch.device, torch.dtype]:
        """Where the models run for ``images``; loads them the first time."""
        device, dtype = target(images, self.device, self.dtype)
        if not self._loaded:
            self._load(dtype)
            self._loaded = True
        return device, dtype


def target(
    images: torch.Tensor, device: torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """Where a reward model runs: the configured device/dtype, else the images' own."""
    return (device or images.device, dtype or images.dtype)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Evaluation mode (dropout off) and no parameter gradients: a reward is never trained."""
    module.eval()
    module.requires_grad_(False)
    return module


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move ``module`` to ``device``/``dtype`` if it is not there already (``.to`` is cheap when it is)."""
    parameter = next(module.parameters(), None)
    if parameter is not None and (parameter.device != device or parameter.dtype != dtype):
        module.to(device=device, dtype=dtype)
    return module
