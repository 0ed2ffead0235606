"""Weighted sums of rewards."""

from __future__ import annotations

import pytest
import torch

from diffrl.rewards import RewardError, load


def test_weighted_sum_logs_each_component(tiny_clip, tiny_mlp):
    reward = load(
        "combined",
        components=[
            {"reward": "aesthetic", "weight": 2.0, "options": {"clip_model": str(tiny_clip), "mlp": str(tiny_mlp)}},
            {"reward": "jpeg_compressibility", "weight": 0.1},
        ],
    )
    assert not reward.differentiable  # jpeg is not
    images = torch.rand(2, 3, 32, 32)
    values, metadata = reward(images, ["a", "b"], [{}, {}])
    aesthetic, _ = load("aesthetic", clip_model=str(tiny_clip), mlp=str(tiny_mlp))(images)
    jpeg, _ = load("jpeg_compressibility")(images)
    torch.testing.assert_close(values, 2.0 * aesthetic + 0.1 * jpeg)
    torch.testing.assert_close(metadata["components"]["aesthetic"], aesthetic.detach())
    torch.testing.assert_close(metadata["components"]["jpeg_compressibility"], jpeg)
    assert metadata["weights"] == {"aesthetic": 2.0, "jpeg_compressibility": 0.1}
    assert "jpeg_kb" in metadata["metadata"]["jpeg_compressibility"]


def test_differentiable_parts_keep_gradients(tiny_clip, tiny_mlp):
    aesthetic = load("aesthetic", clip_model=str(tiny_clip), mlp=str(tiny_mlp))
    reward = load("combined", components=[(aesthetic, 1.0), {"reward": aesthetic, "weight": -0.5, "key": "again"}])
    assert reward.differentiable
    images = torch.rand(1, 3, 32, 32, requires_grad=True)
    values, metadata = reward(images)
    torch.testing.assert_close(values, 0.5 * metadata["components"]["aesthetic"])
    values.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("components", "pattern"),
    [
        ([], "is empty"),
        ("aesthetic", "must be a list"),
        ([{"reward": "jpeg_compressibility"}, {"reward": "jpeg_compressibility"}], "more than once"),
        ([{"reward": "jpeg_compressibility", "wieght": 1.0}], "unknown field.*wieght"),
        ([{"weight": 1.0}], "needs a 'reward'"),
        ([{"reward": "jpeg_compressibility", "weight": "heavy"}], "weight='heavy'"),
        ([{"reward": "jpeg_compressibility", "options": {"qualty": 90}}], "no option 'qualty'"),
    ],
)
def test_bad_components_are_named(components, pattern):
    with pytest.raises(RewardError, match=pattern):
        load("combined", components=components)


class Brightness:
    """A reward written without a ``name`` (like a user's quick callable)."""

    differentiable = True

    def __call__(self, images, prompts=None, prompt_metadata=None):
        return images.mean(dim=(1, 2, 3)), {}


def test_a_reward_without_a_name_is_keyed_by_its_class():
    reward = load("combined", components=[(Brightness(), 2.0)])
    images = torch.rand(2, 3, 4, 4)
    values, metadata = reward(images)
    torch.testing.assert_close(values, 2.0 * images.mean(dim=(1, 2, 3)))
    assert list(metadata["components"]) == ["Brightness"] and reward.differentiable
    with pytest.raises(RewardError, match="is not a reward"):
        load("combined", components=[(lambda images: images, 1.0)])
