"""Input checks shared by all rewards, and the torch image preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffrl.rewards.base import ImageReward, Reward, RewardError, check_images, check_prompts
from diffrl.rewards.preprocess import CLIP_MEAN, CLIP_STD, ImageTransform


def test_images_in_minus_one_one_are_refused_with_the_fix():
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    with pytest.raises(RewardError, match=r"expects images in \[0, 1\].*images / 2 \+ 0.5"):
        check_images(images, "jpeg_compressibility")


@pytest.mark.parametrize(
    ("images", "pattern"),
    [
        (torch.rand(3, 8, 8), "shape \\[B, 3, H, W\\]"),
        (torch.rand(2, 1, 8, 8), "shape \\[B, 3, H, W\\]"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "float images"),
        (torch.full((1, 3, 4, 4), float("nan")), "non-finite"),
        (torch.rand(0, 3, 4, 4), "empty batch"),
        (np.zeros((1, 3, 4, 4)), "torch.Tensor"),
    ],
)
def test_malformed_images_are_refused(images, pattern):
    with pytest.raises(RewardError, match=pattern):
        check_images(images, "r")


def test_bfloat16_images_in_range_pass():
    check_images(torch.rand(2, 3, 4, 4).to(torch.bfloat16), "r")


def test_prompts_must_match_the_batch():
    assert check_prompts(("a", "b"), 2, "r") == ["a", "b"]
    with pytest.raises(RewardError, match="got 1 prompts for 2 images"):
        check_prompts(["a"], 2, "r")
    with pytest.raises(RewardError, match="pass prompts"):
        check_prompts(None, 2, "r")
    with pytest.raises(RewardError, match="single string"):
        check_prompts("ab", 2, "r")


def test_transform_matches_the_clip_image_processor():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    transform = ImageTransform.from_processor(processor)
    assert transform.shortest_edge == 24 and transform.crop == (24, 24) and transform.mode == "bicubic"
    assert transform.mean == pytest.approx(CLIP_MEAN) and transform.std == pytest.approx(CLIP_STD)
    # A smooth image (so PIL's uint8 resampling and ours agree) that is not square.
    y, x = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 56), indexing="ij")
    images = torch.stack([x, y, (x + y) / 2])[None]
    images = (images * 255).round() / 255
    ours = transform(images)
    pixels = (images[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    theirs = processor(images=[pixels], return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, 24, 24)
    assert (ours - theirs).abs().max().item() < 0.05  # ~1% of the normalised range: uint8 rounding in PIL


def test_transform_reads_an_exact_resize_and_is_differentiable():
    from transformers import ViTImageProcessor

    transform = ImageTransform.from_processor(
        ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    )
    assert transform.resize == (16, 16) and transform.shortest_edge is None and transform.crop is None
    images = torch.rand(2, 3, 30, 20, requires_grad=True)
    out = transform(images, torch.bfloat16)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_identity_size_only_normalises():
    transform = ImageTransform(shortest_edge=8, crop=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    images = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(transform(images), images * 2 - 1)


class _Counting(ImageReward):
    """Counts score_images calls; reads prompts when asked to."""

    name, differentiable = "counting", True

    def __init__(self, needs_prompts: bool) -> None:
        self.needs_prompts, self.calls = needs_prompts, []

    def score_images(self, images, prompts, prompt_metadata):
        self.calls.append(prompts)
        return images.mean(dim=(1, 2, 3)), {}


def test_image_reward_checks_before_scoring():
    reward = _Counting(needs_prompts=False)
    assert isinstance(reward, Reward)
    with pytest.raises(RewardError, match=r"reward 'counting' expects images in \[0, 1\]"):
        reward(torch.rand(2, 3, 4, 4) - 1)
    assert reward.calls == []  # refused before the subclass ran
    values, _ = reward(torch.rand(2, 3, 4, 4))
    assert values.shape == (2,) and reward.calls == [None]  # prompts are not needed


def test_image_reward_checks_prompts_when_it_reads_them():
    reward = _Counting(needs_prompts=True)
    with pytest.raises(RewardError, match="reward 'counting' got 1 prompts for 2 images"):
        reward(torch.rand(2, 3, 4, 4), ["a"])
    reward(torch.rand(2, 3, 4, 4), ("a", "b"))
    assert reward.calls == [["a", "b"]]  # as a list
