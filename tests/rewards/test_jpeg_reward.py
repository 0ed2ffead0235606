"""JPEG (in)compressibility."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from diffrl.rewards import RewardError, load
from diffrl.rewards.jpeg import jpeg_kilobytes


def _noisy(level: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    base = torch.full((1, 3, 64, 64), 0.5)
    return (base + level * torch.randn(base.shape, generator=generator)).clamp(0, 1)


def test_size_is_kilobytes_of_a_quality_95_jpeg():
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    expected = []
    for image in images:
        array = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        expected.append(len(buffer.getvalue()) / 1000)
    values, metadata = load("jpeg_incompressibility")(images, None, None)
    assert values.dtype == torch.float32 and values.shape == (2,)
    assert values.tolist() == pytest.approx(expected)
    assert metadata["jpeg_kb"].tolist() == pytest.approx(expected)


def test_compressibility_is_the_negative_and_not_differentiable():
    images = torch.rand(3, 3, 16, 16)
    compress, incompress = load("jpeg_compressibility"), load("jpeg_incompressibility")
    assert not compress.differentiable and not incompress.differentiable
    torch.testing.assert_close(compress(images)[0], -incompress(images)[0])


def test_compressibility_falls_as_noise_rises():
    reward = load("jpeg_compressibility")
    levels = [0.0, 0.02, 0.05, 0.1, 0.2, 0.4]
    values = [reward(_noisy(level))[0].item() for level in levels]
    assert all(later < earlier for earlier, later in zip(values, values[1:])), values


def test_lower_quality_gives_smaller_files():
    images = _noisy(0.1)
    assert jpeg_kilobytes(images, quality=50).item() < jpeg_kilobytes(images, quality=95).item()


def test_bfloat16_and_grad_carrying_inputs_work():
    images = torch.rand(2, 3, 16, 16).to(torch.bfloat16).requires_grad_()
    values, _ = load("jpeg_compressibility")(images)
    assert values.dtype == torch.float32 and not values.requires_grad


def test_out_of_range_images_are_an_error_not_clipped():
    with pytest.raises(RewardError, match=r"\[0, 1\]"):
        load("jpeg_compressibility")(torch.rand(1, 3, 8, 8) * 2 - 1)
