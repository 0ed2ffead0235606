"""Image preprocessing in torch ops, so that gradients reach the images.

Transformers' image processors work on PIL/numpy images and cut the autograd graph.
:class:`ImageTransform` reproduces what a ``CLIPImageProcessor`` / ``ViTImageProcessor``
does (resize, center crop, normalise) with ``torch.nn.functional.interpolate`` on
the images' own device, reading its sizes and statistics from the model's saved
processor config so it follows whatever checkpoint is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["ImageTransform", "CLIP_MEAN", "CLIP_STD", "to_uint8_arrays"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI CLIP's per-channel normalisation mean (Radford et al. 2021)."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP's per-channel normalisation standard deviation."""

# PIL resampling codes as stored in preprocessor_config.json -> interpolate modes.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _size_field(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value is not None else None


@dataclass(frozen=True)
class ImageTransform:
    """Resize, center-crop and normalise ``[B, 3, H, W]`` images in ``[0, 1]``.

    ``shortest_edge`` resizes keeping the aspect ratio (CLIP); ``longest_edge`` does the
    same for the long side, and a ``crop`` larger than the result pads it with black, centred
    (open_clip's ``ResizeMaxSize``, which HPSv2 scores with); ``resize`` resizes to an exact
    ``(height, width)`` (ViT). Resizing is antialiased and computed in float32 (bicubic
    antialiasing has no bfloat16 kernel on CPU); the output is cast to ``dtype``.
    """

    shortest_edge: int | None = 224
    longest_edge: int | None = None
    resize: tuple[int, int] | None = None
    crop: tuple[int, int] | None = (224, 224)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    mode: str = "bicubic"

    @classmethod
    def from_processor(cls, processor: Any) -> ImageTransform:
        """Read sizes, crop and statistics from a transformers image processor (or a processor holding one)."""
        processor = getattr(processor, "image_processor", processor)
        size = getattr(processor, "size", None) if getattr(processor, "do_resize", True) else None
        shortest = _size_field(size, "shortest_edge")
        height, width = _size_field(size, "height"), _size_field(size, "width")
        resize = (height, width) if shortest is None and height and width else None
        crop = None
        if getattr(processor, "do_center_crop", False):
            crop_size = getattr(processor, "crop_size", None)
            crop = (_size_field(crop_size, "height"), _size_field(crop_size, "width"))
            if None in crop:
                crop = None
        normalize = getattr(processor, "do_normalize", True)
        mean = tuple(processor.image_mean) if normalize else (0.0, 0.0, 0.0)
        std = tuple(processor.image_std) if normalize else (1.0, 1.0, 1.0)
        resample = getattr(processor, "resample", 3)
        mode = _RESAMPLE.get(int(resample) if resample is not None else 3, "bicubic")
        return cls(shortest_edge=shortest, resize=resize, crop=crop, mean=mean, std=std, mode=mode)

    def __call__(self, images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Return the model input for ``images`` (differentiable, on the images' device)."""
        x = images.float()
        height, width = x.shape[-2:]
        target: tuple[int, int] | None = self.resize
        if self.shortest_edge is not None:
            # Aspect-preserving resize of the short side, as transformers' get_resize_output_image_size.
            short, long = (height, width) if height <= width else (width, height)
            new_long = int(self.shortest_edge * long / short)
            target = (self.shortest_edge, new_long) if height <= width else (new_long, self.shortest_edge)
        elif self.longest_edge is not None:
            # open_clip's ResizeMaxSize: scale = longest_edge / max(h, w), each side rounded.
            scale = self.longest_edge / max(height, width)
            target = (round(height * scale), round(width * scale))
        if target is not None and tuple(target) != (height, width):
            antialias = self.mode in ("bilinear", "bicubic")
            align = False if antialias else None
            x = F.interpolate(x, size=target, mode=self.mode, antialias=antialias, align_corners=align)
            x = x.clamp(0.0, 1.0)  # PIL resamples uint8 images, so bicubic overshoot is clipped there too
        if self.crop is not None:
            x = _center_crop(x, self.crop)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        x = (x - mean) / std
        return x.to(dtype) if dtype is not None else x


def _center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    height, width = x.shape[-2:]
    crop_h, crop_w = size
    if crop_h > height or crop_w > width:
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        height, width = x.shape[-2:]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return x[..., top : top + crop_h, left : left + crop_w]


def to_uint8_arrays(images: torch.Tensor) -> list[Any]:
    """``[B, 3, H, W]`` in ``[0, 1]`` -> list of ``H x W x 3`` uint8 numpy arrays (for PIL-based processors)."""
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    return list(pixels.permute(0, 2, 3, 1).cpu().numpy())
