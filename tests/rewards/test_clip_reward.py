"""CLIP score and PickScore on a tiny random CLIP."""

from __future__ import annotations

import pytest
import torch

from diffrl.rewards import RewardError, load

PROMPTS = ["a cat", "a dog riding a bike"]


def _reference_logits(path, images, prompts):
    """CLIPModel's own forward: logits_per_image = exp(logit_scale) * cos, for 32x32 inputs (no resize)."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(path).eval()
    tokens = AutoTokenizer.from_pretrained(path)(prompts, padding=True, return_tensors="pt")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=(images - mean) / std)
    return out.logits_per_image.diagonal(), model.logit_scale.exp().item()


def test_pickscore_equals_clip_logits_of_each_pair(tiny_clip):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    reward = load("pickscore", model=str(tiny_clip), processor=str(tiny_clip))
    values, metadata = reward(images, PROMPTS, [{}, {}])
    expected, logit_scale = _reference_logits(tiny_clip, images, PROMPTS)
    assert values.shape == (2,) and values.dtype == torch.float32
    torch.testing.assert_close(values, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(metadata["cosine"] * logit_scale, values, atol=1e-4, rtol=1e-4)


def test_clip_score_is_100_times_the_cosine(tiny_clip):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    values, metadata = load("clip_score", model=str(tiny_clip))(images, PROMPTS)
    expected, logit_scale = _reference_logits(tiny_clip, images, PROMPTS)
    torch.testing.assert_close(values, 100 * expected / logit_scale, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(values, 100 * metadata["cosine"])
    scaled, _ = load("clip_score", model=str(tiny_clip), scale=2.5)(images, PROMPTS)
    torch.testing.assert_close(scaled, 2.5 * metadata["cosine"])


def test_prompt_changes_the_score(tiny_clip):
    images = torch.rand(1, 3, 32, 32).expand(2, -1, -1, -1)
    values, _ = load("clip_score", model=str(tiny_clip))(images, PROMPTS)
    assert values[0].item() != pytest.approx(values[1].item())


@pytest.mark.parametrize("name", ["clip_score", "pickscore"])
def test_gradients_reach_the_images_through_a_resize(tiny_clip, name):
    reward = load(name, model=str(tiny_clip), processor=str(tiny_clip))
    assert reward.differentiable
    images = torch.rand(2, 3, 50, 64, requires_grad=True)
    values, _ = reward(images, PROMPTS)
    values.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_bfloat16_runs_close_to_float32(tiny_clip):
    reward = load("clip_score", model=str(tiny_clip))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    full, _ = reward(images, PROMPTS)
    half, _ = reward(images.to(torch.bfloat16), PROMPTS)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=3.0, rtol=0.05)  # 100 * cos in bfloat16


def test_prompts_are_required(tiny_clip):
    reward = load("clip_score", model=str(tiny_clip))
    with pytest.raises(RewardError, match="pass prompts"):
        reward(torch.rand(2, 3, 32, 32))
    with pytest.raises(RewardError, match="got 1 prompts for 2 images"):
        reward(torch.rand(2, 3, 32, 32), ["a cat"])
