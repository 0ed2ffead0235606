"""The reward registry: names, option checking, registration."""

from __future__ import annotations

import pytest
import torch

import diffrl.rewards as rewards
from diffrl.rewards import Reward, RewardError

PAPER_REWARDS = {
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "aesthetic",
    "clip_score",
    "pickscore",
    "classifier",
    "over50",
    "alignment",
    "remote",
    "combined",
}


def test_every_reward_of_the_issue_is_registered():
    assert PAPER_REWARDS <= set(rewards.available())


def test_unknown_reward_lists_the_known_ones():
    with pytest.raises(RewardError, match="unknown reward 'aesthetc'") as info:
        rewards.load("aesthetc")
    message = str(info.value)
    assert "did you mean 'aesthetic'" in message
    for name in PAPER_REWARDS:
        assert name in message


def test_unknown_option_is_named_with_a_suggestion():
    with pytest.raises(RewardError, match="no option 'clip_modle'.*did you mean 'clip_model'"):
        rewards.load("aesthetic", clip_modle="x")


def test_missing_required_option_is_named():
    with pytest.raises(RewardError, match="needs option.*url"):
        rewards.load("remote")
    with pytest.raises(RewardError, match="needs option.*classes"):
        rewards.load("classifier", model="x")


def test_building_a_model_reward_loads_nothing():
    # Models load on the first call: a path that does not exist is only an error then.
    reward = rewards.load("aesthetic", clip_model="/nonexistent/clip", mlp="/nonexistent/mlp.pth")
    assert isinstance(reward, Reward) and reward.differentiable
    with pytest.raises(RewardError, match="clip_model='/nonexistent/clip'"):
        reward(torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize(
    ("name", "options", "pattern"),
    [
        ("jpeg_compressibility", {"quality": 0}, "quality=0"),
        ("classifier", {"model": "m", "classes": [6], "output": "softmax"}, "output='softmax'"),
        ("classifier", {"model": "m", "classes": []}, "classes=\\[\\]"),
        ("clip_score", {"dtype": "float8"}, "dtype='float8'"),
        ("clip_score", {"scale": "big"}, "scale='big'"),
        ("aesthetic", {"device": "gpu9"}, "device='gpu9'"),
        ("remote", {"url": "localhost:8000"}, "url='localhost:8000'"),
        ("remote", {"url": "http://127.0.0.1:1", "retries": -1}, "retries=-1"),
        ("remote", {"url": "http://127.0.0.1:1", "encoding": "png"}, "encoding='png'"),
        ("alignment", {"reference": "The image contains"}, "reference="),
        ("alignment", {"max_new_tokens": 0}, "max_new_tokens=0"),
    ],
)
def test_bad_option_values_are_named(name, options, pattern):
    with pytest.raises(RewardError, match=pattern):
        rewards.load(name, **options)


class _Constant:
    name = "constant"
    differentiable = True

    def __init__(self, *, value: float = 1.0) -> None:
        self.value = value

    def __call__(self, images, prompts=None, prompt_metadata=None):
        return torch.full((images.shape[0],), self.value, device=images.device), {}


def test_register_a_custom_reward_and_refuse_to_shadow_it():
    rewards.register("test_constant", _Constant)
    try:
        reward = rewards.load("test_constant", value=2.5)
        values, _ = reward(torch.rand(3, 3, 4, 4))
        assert values.tolist() == [2.5, 2.5, 2.5]
        with pytest.raises(RewardError, match="no option 'valeu'"):
            rewards.load("test_constant", valeu=1.0)
        with pytest.raises(RewardError, match="already registered"):
            rewards.register("test_constant", _Constant)
        rewards.register("test_constant", lambda **kw: _Constant(value=-1.0, **kw), overwrite=True)
        assert rewards.load("test_constant")(torch.rand(1, 3, 4, 4))[0].item() == -1.0
    finally:
        rewards._REGISTRY.pop("test_constant", None)


def test_one_registry_serves_rewards_and_prompt_sources():
    from diffrl import prompts
    from diffrl.registry import Registry

    assert isinstance(rewards.REWARDS, Registry) and isinstance(prompts.SOURCES, Registry)
    with pytest.raises(RewardError, match="the factory for reward 'x' must be callable"):
        rewards.register("x", 3)
    with pytest.raises(prompts.PromptError, match="the factory for prompt source 'x' must be callable"):
        prompts.register("x", 3)
    with pytest.raises(prompts.PromptError, match="unknown prompt source 'counting2'.*did you mean 'counting'"):
        prompts.load("counting2")
    assert "x" not in rewards.available() and "x" not in prompts.available()
