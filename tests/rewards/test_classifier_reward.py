"""Classifier rewards (and the OVER50 preset) on a tiny random ViT."""

from __future__ import annotations

import pytest
import torch

from diffrl.rewards import RewardError, load


def _reference_logits(path, images):
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return model(pixel_values=images * 2 - 1).logits  # ViT processor: mean = std = 0.5, 32x32 is the input size


def test_over50_sums_the_logits_of_classes_6_and_up(tiny_vit):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    values, metadata = load("over50", model=str(tiny_vit))(images)
    logits = _reference_logits(tiny_vit, images)
    assert values.shape == (3,) and values.dtype == torch.float32
    torch.testing.assert_close(values, logits[:, 6:].sum(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metadata["probability"], logits.softmax(-1)[:, 6:].sum(-1), atol=1e-5, rtol=1e-5)


def test_classes_by_label_name_and_probabilities(tiny_vit):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    values, _ = load("classifier", model=str(tiny_vit), classes=["class_1", 3], output="probabilities")(images)
    expected = _reference_logits(tiny_vit, images).softmax(-1)[:, [1, 3]].sum(-1)
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-5)
    assert ((values >= 0) & (values <= 1)).all()


def test_unknown_class_is_named(tiny_vit):
    reward = load("classifier", model=str(tiny_vit), classes=[9])
    with pytest.raises(RewardError, match="class 9 is not one of model .* 9 classes"):
        reward(torch.rand(1, 3, 32, 32))
    with pytest.raises(RewardError, match="class 'old' is not one of"):
        load("classifier", model=str(tiny_vit), classes=["old"])(torch.rand(1, 3, 32, 32))


def test_gradients_reach_the_images_and_bfloat16_runs(tiny_vit):
    reward = load("over50", model=str(tiny_vit))
    assert reward.differentiable
    images = torch.rand(2, 3, 64, 48, requires_grad=True)
    values, _ = reward(images)
    values.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    half, _ = reward(images.detach().to(torch.bfloat16))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, values.detach(), atol=0.1, rtol=0.1)
