"""Rewards on a CUDA device (``pytest -m gpu``): models follow the images' device and dtype."""

from __future__ import annotations

import pytest
import torch

from diffrl.rewards import load

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_model_rewards_follow_the_images_to_the_gpu(tiny_clip, tiny_mlp, tiny_vit, dtype):
    rewards = [
        load("aesthetic", clip_model=str(tiny_clip), mlp=str(tiny_mlp)),
        load("clip_score", model=str(tiny_clip)),
        load("over50", model=str(tiny_vit)),
    ]
    images = torch.rand(2, 3, 48, 48, device="cuda", dtype=dtype, requires_grad=True)
    for reward in rewards:
        values, _ = reward(images, ["a cat", "a dog"])
        assert values.device.type == "cuda" and values.dtype == torch.float32 and values.shape == (2,)
        (grad,) = torch.autograd.grad(values.sum(), images)
        assert grad.abs().sum() > 0, reward.name


def test_alignment_and_jpeg_on_the_gpu(tiny_llava, tiny_bert):
    images = torch.rand(2, 3, 16, 16, device="cuda", dtype=torch.bfloat16)
    alignment = load("alignment", vlm=str(tiny_llava), bert=str(tiny_bert), bert_layer=2, max_new_tokens=3)
    values, _ = alignment(images, ["a cat", "a dog"])
    assert values.device.type == "cuda" and values.shape == (2,)
    values, _ = load("jpeg_compressibility")(images)
    assert values.device.type == "cuda" and (values < 0).all()
