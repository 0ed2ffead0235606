"""Mixed precision: frozen weights in half precision, trainable weights and step math in float32."""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal

import torch

MixedPrecision = Literal["no", "fp16", "bf16"]

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen weights are stored in for ``mixed_precision`` ("no", "fp16" or "bf16")."""
    if mixed_precision not in _DTYPES:
        raise ValueError(f"mixed_precision={mixed_precision!r} is not supported; use 'no', 'fp16' or 'bf16'.")
    return _DTYPES[mixed_precision]


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating-point weight: what its inputs are cast to outside autocast.

    diffusers' ``ModelMixin.dtype`` says the same for the modules diffrl loads (no layerwise-casting hooks,
    no ``_keep_in_fp32_modules``), but walks every submodule looking for such hooks first: 2.5 ms per call on
    the tiny PEFT UNet of the tests, about 15% of sampling time at 8x8 latents, once per UNet call."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


@contextlib.contextmanager
def autocast(device: torch.device, mixed_precision: str) -> Iterator[None]:
    """``torch.autocast`` to the half dtype, or nothing in full precision."""
    if mixed_precision == "no":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=weight_dtype(mixed_precision)):
        yield


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move ``module`` to ``device``, casting only when its dtype differs (avoids needless casts and warnings)."""
    module.to(device=device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    return module


def place_policy_modules(frozen: list[torch.nn.Module], unet: torch.nn.Module, use_lora: bool,
                         device: torch.device, mixed_precision: str) -> None:
    """Frozen modules (and a LoRA-adapted UNet's base weights) in the half dtype; trainable weights in float32."""
    half = weight_dtype(mixed_precision)
    for module in frozen:
        place(module.requires_grad_(False).eval(), device, half)
    place(unet, device, half if use_lora else torch.float32)
    for param in unet.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
