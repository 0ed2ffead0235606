"""JPEG (in)compressibility: the file size of each image saved as a JPEG.

The DDPO paper's simplest reward (Black et al. 2023, sec. 6.1): the size in kB
(bytes / 1000) of the image encoded as JPEG at quality 95; compressibility is its
negative. It needs no model and is not differentiable.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from diffrl.rewards.base import ImageReward, PromptMetadata, Prompts, RewardError, RewardOutput
from diffrl.rewards.preprocess import to_uint8_arrays

__all__ = ["JpegSize", "check_quality", "encode_jpeg", "jpeg_compressibility", "jpeg_incompressibility",
           "jpeg_kilobytes", "jpeg_round_trip"]


def check_quality(quality: Any, *, reward: str, setting: str = "quality") -> None:
    """Raise unless ``quality`` is a JPEG quality, an integer in [1, 100], naming the option."""
    if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 100:
        raise RewardError(f"reward '{reward}': option {setting}={quality!r} must be an integer in [1, 100]")


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """An ``H x W x 3`` uint8 image encoded as JPEG at ``quality`` (PIL, 4:2:0 chroma subsampling)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each ``[B, 3, H, W]`` image in ``[0, 1]`` encoded as JPEG at ``quality`` (float32, CPU)."""
    sizes = [len(encode_jpeg(pixels, quality)) / 1000.0 for pixels in to_uint8_arrays(images)]
    return torch.tensor(sizes, dtype=torch.float32)


def jpeg_round_trip(images: torch.Tensor, quality: int) -> list[np.ndarray]:
    """Each ``[B, 3, H, W]`` image in ``[0, 1]`` encoded as JPEG at ``quality`` and decoded again, as ``H x W x 3``
    uint8 arrays: what a VLM saw in ddpo-pytorch, which sent its images to LLaVA as JPEG at quality 80."""
    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(encode_jpeg(pixels, quality))).convert("RGB"))
            for pixels in to_uint8_arrays(images)]


class JpegSize(ImageReward):
    """``sign * kB`` of each image as a JPEG: ``sign=-1`` rewards compressibility, ``+1`` incompressibility."""

    differentiable = False

    def __init__(self, *, name: str, sign: float, quality: int = 95) -> None:
        check_quality(quality, reward=name)
        self.name = name
        self.sign = float(sign)
        self.quality = quality

    def score_images(self, images: torch.Tensor, prompts: Prompts, prompt_metadata: PromptMetadata) -> RewardOutput:
        kilobytes = jpeg_kilobytes(images, self.quality).to(images.device)
        return self.sign * kilobytes, {"jpeg_kb": kilobytes}


def jpeg_compressibility(*, quality: int = 95) -> JpegSize:
    """Reward ``-kB`` of the JPEG at ``quality``: smaller files score higher."""
    return JpegSize(name="jpeg_compressibility", sign=-1.0, quality=quality)


def jpeg_incompressibility(*, quality: int = 95) -> JpegSize:
    """Reward ``+kB`` of the JPEG at ``quality``: larger (more detailed) files score higher."""
    return JpegSize(name="jpeg_incompressibility", sign=1.0, quality=quality)
