"""JPEG (in)compressibility: the file size of each image saved as a JPEG.

The DDPO paper's simplest reward (Black et al. 2023, sec. 6.1): the size in kB
(bytes / 1000) of the image encoded as JPEG at quality 95; compressibility is its
negative. It needs no model and is not differentiable.
"""

from __future__ import annotations

import io

import torch

from diffrl.rewards.base import ImageReward, PromptMetadata, Prompts, RewardError, RewardOutput

__all__ = ["JpegSize", "jpeg_compressibility", "jpeg_incompressibility", "jpeg_kilobytes"]


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each ``[B, 3, H, W]`` image in ``[0, 1]`` encoded as JPEG at ``quality`` (float32, CPU)."""
    from PIL import Image

    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
    sizes = []
    for array in pixels.permute(0, 2, 3, 1).cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegSize(ImageReward):
    """``sign * kB`` of each image as a JPEG: ``sign=-1`` rewards compressibility, ``+1`` incompressibility."""

    differentiable = False

    def __init__(self, *, name: str, sign: float, quality: int = 95) -> None:
        if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 100:
            raise RewardError(
                f"reward '{name}': option quality={quality!r} must be an integer in [1, 100] (the papers use 95)"
            )
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
