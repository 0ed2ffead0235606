"""Your own reward and prompt code by reference (``package.module:function``) and installed packages' entry points,
from Python, from the config and from ``diffrl train``."""

from __future__ import annotations

import json
import textwrap

import pytest

from diffrl import build, prompts, rewards
from diffrl.cli import main
from diffrl.prompts import PromptError
from diffrl.rewards import RewardError

MODULE = '''
import json, os
import torch

def brightness(images, prompts, prompt_metadata, scale=1.0):
    path = os.environ.get("SEEN_PROMPTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(list(prompts)) + "\\n")
    return scale * images.mean(dim=(1, 2, 3)), {}

class Darkness:
    def __init__(self, strength=1.0):
        self.strength = strength
    def __call__(self, images, prompts, prompt_metadata):
        return -self.strength * images.mean(dim=(1, 2, 3)), {}

def make_reward(offset):
    return lambda images, prompts, prompt_metadata: (images.mean(dim=(1, 2, 3)) + offset, {})

def one_prompt():
    return "a red square", {"colour": "red"}

def my_prompts(words=("a", "b"), seed=0):
    from diffrl.prompts import PromptList
    return PromptList(list(words), seed=seed, order="cycle")

def recording(images, prompts, prompt_metadata):
    with open(os.environ["SEEN_PROMPTS"], "a") as f:
        f.write(json.dumps([list(prompts), list(prompt_metadata)]) + "\\n")
    return images.mean(dim=(1, 2, 3)), {}

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_a_reward_function_with_trls_signature_is_used_as_it_is(user_module):
    import torch

    images = torch.full((2, 3, 4, 4), 0.5)
    fn = rewards.load(f"{user_module}:brightness")
    assert fn(images, ["a", "b"], [{}, {}])[0].tolist() == [0.5, 0.5]
    scaled = rewards.load(f"{user_module}:brightness", scale=2.0)  # reward_options bind as keyword arguments
    assert scaled(images, ["a", "b"], [{}, {}])[0].tolist() == [1.0, 1.0]
    assert rewards.load(f"{user_module}:Darkness", strength=3.0).strength == 3.0  # a class: built with the options
    assert rewards.load(f"{user_module}:make_reward", offset=1.0)(images, ["a", "b"], [{}, {}])[0].tolist() == [1.5,
                                                                                                                1.5]


@pytest.mark.parametrize("reference,message", [
    ("not_a_module_xyz:f", "module 'not_a_module_xyz' cannot be imported"),
    ("my_rewards:brightnes", "has no attribute 'brightnes' (did you mean 'brightness'?)"),
    ("my_rewards:NOT_CALLABLE", "is a int, not a function or class"),
    ("my_rewards:make_reward", "needs option(s) offset"),
])
def test_bad_references_name_the_reference_and_the_fix(user_module, reference, message):
    with pytest.raises(RewardError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        rewards.load(reference)


def test_prompt_references_and_the_runs_seed(user_module, tmp_path):
    assert prompts.load(f"{user_module}:one_prompt")() == ("a red square", {"colour": "red"})
    source = prompts.load(f"{user_module}:my_prompts", words=["x", "y", "z"])
    assert [source()[0] for _ in range(4)] == ["x", "y", "z", "x"]
    assert prompts.SOURCES.takes_option(f"{user_module}:my_prompts", "seed")  # diffrl train seeds it with the run's
    assert not prompts.SOURCES.takes_option(f"{user_module}:one_prompt", "seed")
    with pytest.raises(PromptError, match="has no attribute 'one_promt' .*did you mean 'one_prompt'"):
        prompts.load(f"{user_module}:one_promt")


def test_an_installed_packages_entry_point_is_a_known_reward(user_module, tmp_path, monkeypatch):
    dist = tmp_path / "my_rewards_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-rewards-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[diffrl.rewards]\nmy_brightness = my_rewards:brightness\n")
    monkeypatch.setattr(rewards.REWARDS, "factories", dict(rewards.REWARDS.factories))
    monkeypatch.setattr(rewards.REWARDS, "_plugins_loaded", False)
    assert "my_brightness" in rewards.available()
    import torch

    fn = rewards.load("my_brightness")
    assert fn(torch.ones(1, 3, 2, 2), [""], [{}])[0].tolist() == [1.0]


def test_diffrl_train_with_a_reward_reference_scores_with_it(user_module, tmp_path, monkeypatch):
    seen = tmp_path / "seen.jsonl"
    monkeypatch.setenv("SEEN_PROMPTS", str(seen))
    assert main(["train", f"reward={user_module}:brightness", f"prompts={user_module}:my_prompts",
                 "prompt_options.words=[p, q]", "num_epochs=1", "sample_num_steps=2", "sample_batch_size=4",
                 "sample_num_batches_per_epoch=1", "train_batch_size=4", "eval_num_samples=8", "save_freq=1",
                 f"logdir={tmp_path / 'logs'}", "run_name=r"]) == 0
    scored = [json.loads(line) for line in seen.read_text().splitlines()]
    assert ["p", "q", "p", "q"] in scored  # the training batch: the user's reward got the user's prompts
    assert f"reward: {user_module}:brightness" in (tmp_path / "logs" / "r" / "config.yaml").read_text()


def test_a_bad_reference_is_one_line_and_exit_2_before_any_model_loads(user_module, tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the reward reference was checked")

    monkeypatch.setattr(build, "load_policy", no_loading)
    assert main(["train", f"reward={user_module}:brightnes", f"logdir={tmp_path / 'logs'}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "did you mean 'brightness'?" in lines[0]


def test_diffrl_train_on_a_text_model_with_jsonl_prompts_and_held_out_eval_prompts(user_module, tiny_sd_path, tmp_path,
                                                                                    monkeypatch):
    """The issue's command: your reward by reference, JSONL prompts whose metadata reaches it, and a held-out JSONL
    set that training-time evaluation scores (with its own metadata)."""
    seen = tmp_path / "seen.jsonl"
    monkeypatch.setenv("SEEN_PROMPTS", str(seen))
    train = tmp_path / "prompts.jsonl"
    train.write_text("\n".join(json.dumps({"prompt": f"a {c} cube", "colour": c}) for c in ("red", "blue")))
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"prompt": "a green sphere", "colour": "green", "tag": "heldout"}))
    assert main(["train", f"model={tiny_sd_path}", f"reward={user_module}:recording", "prompts=jsonl",
                 f"prompt_options.path={train}", "eval_prompts=jsonl", f"eval_prompt_options.path={held}",
                 "num_epochs=1", "sample_num_steps=2", "sample_batch_size=2", "sample_num_batches_per_epoch=1",
                 "train_batch_size=2", "eval_every=1", "eval_num_samples=2", "eval_num_steps=2", "save_freq=1",
                 f"logdir={tmp_path / 'logs'}", "run_name=j"]) == 0
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    pairs = [(p, m) for prompts_, metadata in calls for p, m in zip(prompts_, metadata)]
    trained = [(p, m) for p, m in pairs if "cube" in p]
    assert trained and all(m == {"colour": p.split()[1]} for p, m in trained)  # each prompt with its own metadata
    evaluated = [(p, m) for p, m in pairs if "sphere" in p]
    assert evaluated and all(m == {"colour": "green", "tag": "heldout"} for _, m in evaluated)
    assert {p for p, _ in pairs} <= {"a red cube", "a blue cube", "a green sphere"}
