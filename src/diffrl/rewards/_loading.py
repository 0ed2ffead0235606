"""Loading transformers models once, lazily, onto the device and dtype the caller uses."""

from __future__ import annotations

from pathlib import Path
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


def resolve_file(location: str, filename: str, *, reward: str, setting: str) -> Path:
    """A weights file named by option ``setting``: a local file, a local folder holding ``filename``, or a Hub
    repo id ``owner/name`` from which ``filename`` is downloaded (cached by huggingface_hub)."""
    local = Path(location).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        return local / filename
    if location.startswith((".", "/", "~")) or location.count("/") != 1:
        raise RewardError(
            f"reward '{reward}': option {setting}={location!r} is neither a local file/directory nor a Hub repo id "
            "'owner/name'"
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=location, filename=filename))
    except Exception as error:  # network, authentication or missing-file errors from the Hub client
        raise RewardError(
            f"reward '{reward}': could not download {filename!r} from Hub repo {setting}={location!r} ({error}); "
            f"give a local path with option {setting} instead"
        ) from error


def load_tensors(path: Path, *, reward: str, setting: str) -> Any:
    """The tensors in a ``.safetensors`` file, or a ``.pt``/``.pth`` file read without executing pickle code
    (``torch.load(weights_only=True)`` refuses anything but tensors and plain containers)."""
    if not path.is_file():
        raise RewardError(f"reward '{reward}': weights file {str(path)!r} does not exist; check option {setting}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError or RuntimeError depending on version
        raise RewardError(
            f"reward '{reward}': {str(path)!r} is not a plain state dict of tensors, refusing to unpickle it "
            f"({type(error).__name__}); convert it to safetensors or give the original published file"
        ) from error


def load_exactly(module: torch.nn.Module, state: Any, *, reward: str, source: str, target: str) -> None:
    """Load ``state`` into ``module``: every parameter present with its shape, nothing left over (buffers that
    the module computes itself may be absent), else one error naming both sides."""
    parameters = dict(module.named_parameters())
    missing = sorted(set(parameters) - set(state))
    unexpected = sorted(set(state) - set(module.state_dict()))
    shapes = sorted(key for key, value in state.items() if key in parameters and parameters[key].shape != value.shape)
    if missing or unexpected or shapes:
        raise RewardError(
            f"reward '{reward}': the weights in {source} do not fit the architecture of {target} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, other shape {shapes[:3]}); "
            "give the files of the published model together"
        )
    module.load_state_dict(state, strict=False)


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
