"""A reward and a prompt source of your own, used by `diffrl train` without a wrapper script.

    PYTHONPATH=examples/custom_reward diffrl train reward=my_rewards:contrast num_epochs=4
    PYTHONPATH=examples/custom_reward diffrl train reward=my_rewards:Darkness reward_options.strength=2

Any module on PYTHONPATH (or in an installed package) works the same way: `reward: package.module:attribute`.
"""

from __future__ import annotations

import torch


def contrast(images: torch.Tensor, prompts, prompt_metadata, scale: float = 1.0):
    """TRL's reward signature: images [B, 3, H, W] in [0, 1] -> (rewards [B], metadata).

    The standard deviation of each image's pixels: strokes with crisp edges on a clean background score high.
    `reward_options.scale=...` becomes the `scale` keyword argument of every call."""
    rewards = scale * images.flatten(1).std(dim=1)
    return rewards, {"mean_pixel": float(images.mean())}


class Darkness:
    """A class is a factory: `reward_options` go to its constructor; the instance is the reward."""

    differentiable = True  # gradients flow to the images, so reward backpropagation (AlignProp) may use it

    def __init__(self, strength: float = 1.0) -> None:
        self.strength = strength

    def __call__(self, images: torch.Tensor, prompts, prompt_metadata):
        return -self.strength * images.mean(dim=(1, 2, 3)), {}


def two_styles():
    """A prompt function without parameters is used as it is (TRL's prompt_fn): `prompts=my_rewards:two_styles`."""
    return "a bold digit", {"style": "bold"}
