import json
import random

import numpy as np
import pytest
import torch

from diffrl import AlignPropConfig, AlignPropTrainer, DefaultDDPODDPMPipeline, DefaultDDPOStableDiffusionPipeline
from diffrl.config import ConfigError, load_config
from diffrl.rewards import RewardError

from .helpers import assert_same_run, interrupt_and_resume, logged_metrics, trainable_weights


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: one thread. Two OpenMP threads on a busy 2-core machine spin at every op's barrier and made
    # this file about 10x slower (240 s instead of 20 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


def random_prompt():
    return random.choice(["a cat", "a dog", "a fox"]), {"source": "test"}


def _config(tmp_path, **kw):
    base = dict(num_epochs=2, sample_num_steps=4, train_batch_size=2, mixed_precision="no",
                logdir=str(tmp_path / "logs"), run_name="run", seed=1)
    base.update(kw)
    return AlignPropConfig(**base)


class UNetCalls:
    """Records every UNet call: its timestep, whether autograd was on, whether the reward's gradient reached its
    output, and whether it ran in the backward pass (a gradient-checkpointing recomputation, which may stop
    early, so calls are recorded when they start)."""

    def __init__(self, unet):
        self.calls, self.in_backward = [], False
        unet.register_forward_pre_hook(self._start)
        unet.register_forward_hook(self._end)

    def _start(self, module, args):
        self.calls.append({"t": int(args[1].reshape(-1)[0]), "batch": args[0].shape[0],
                           "grad": torch.is_grad_enabled(), "backward": self.in_backward, "grad_norm": 0.0})

    def _end(self, module, args, output):
        call = self.calls[-1]
        if output.sample.requires_grad and not self.in_backward:
            output.sample.register_hook(lambda g: call.__setitem__("grad_norm", float(g.norm())))

    def forward_calls(self):
        return [c for c in self.calls if not c["backward"]]


def _step_of(trainer, n):
    return {int(t): i for i, t in enumerate(trainer.policy.schedule.timesteps(n))}


STRATEGIES = [
    ("fixed", {"truncated_backprop_timestep": 2}),
    ("random", {"truncated_rand_backprop_minmax": (0, 4)}),
    ("draft_k", {"draft_k": 3}),
    ("draft_lv", {"draft_lv_draws": 3}),
    ("refl", {"refl_min_step": 1, "refl_max_step": 2}),
]


@pytest.mark.parametrize("strategy,extra", STRATEGIES, ids=[s for s, _ in STRATEGIES])
def test_gradients_reach_the_unet_only_at_the_steps_the_strategy_says(tiny_ddpm_path, tmp_path, strategy, extra):
    trainer = AlignPropTrainer(_config(tmp_path, truncation=strategy, **extra), brightness, lambda: ("", {}),
                               DefaultDDPODDPMPipeline(tiny_ddpm_path))
    calls = UNetCalls(trainer.policy._unet)
    step_of = _step_of(trainer, 4)
    for seed in (0, 1):  # two batches (the random strategies draw different plans)
        calls.calls.clear()
        trainer.policy._unet.zero_grad(set_to_none=True)
        pairs = trainer._generate_samples(2, generator=torch.Generator().manual_seed(seed))
        plan = trainer.last_plan
        loss = trainer.calculate_loss(trainer.compute_rewards(pairs))
        calls.in_backward = True
        loss.backward()
        calls.in_backward = False

        expected = {i for i, flag in enumerate(plan.grad_steps) if flag}
        forward = calls.forward_calls()
        chain = forward[:len(plan.grad_steps)]
        assert [step_of[c["t"]] for c in chain] == list(range(len(plan.grad_steps)))
        if strategy == "draft_lv":  # the chain runs without gradients; then one UNet call on 3 re-noised copies
            assert not any(c["grad"] for c in chain)
            (extra_call,) = forward[len(chain):]
            assert step_of[extra_call["t"]] == 3 and extra_call["batch"] == 3 * 2 and extra_call["grad"]
            assert extra_call["grad_norm"] > 0
            assert pairs["images"].shape[0] == 6 and pairs["prompts"] == [""] * 6
            first, second = pairs["images"].detach().chunk(3)[:2]  # draws differ only by their noise
            assert float((first - second).abs().max()) > 0
        else:
            assert len(forward) == len(plan.grad_steps)
            assert {step_of[c["t"]] for c in chain if c["grad"]} == expected
            assert {step_of[c["t"]] for c in chain if c["grad_norm"] > 0} == expected
        # Gradient checkpointing (on by default): exactly the calls that carry gradients are recomputed.
        recomputed = [c for c in calls.calls if c["backward"]]
        assert sorted(c["t"] for c in recomputed) == sorted(c["t"] for c in forward if c["grad"])
        grads = [p.grad for p in trainer.policy.trainable_parameters()]
        assert all(g is not None for g in grads) and any(float(g.abs().max()) > 0 for g in grads)

        # The strategy's own rule, restated.
        n = len(plan.grad_steps)
        if strategy == "fixed":  # steps i >= truncated_backprop_timestep
            assert expected == {2, 3}
        elif strategy == "draft_k":  # the last K
            assert expected == {1, 2, 3}
        elif strategy == "random":
            assert expected == set(range(plan.first_grad_step, 4)) and plan.first_grad_step < 4
        elif strategy == "refl":
            assert expected == {n - 1} and 1 <= n - 1 <= 2 and plan.stop_after_step == n


def test_truncated_gradients_equal_a_hand_built_trl_graph(tiny_ddpm_path, tmp_path):
    # TRL's rgb_with_grad runs every UNet call with autograd and detaches the outputs of the steps i < k. The
    # trainer runs those steps without autograd instead; the gradients must be the same.
    trainer = AlignPropTrainer(_config(tmp_path, truncation="fixed", truncated_backprop_timestep=2, sample_eta=1.0,
                                       gradient_checkpointing=False),
                               brightness, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path))
    policy, params = trainer.policy, list(trainer.policy.trainable_parameters())
    pairs = trainer._generate_samples(2, generator=torch.Generator().manual_seed(5))
    ours = torch.autograd.grad(trainer.calculate_loss(trainer.compute_rewards(pairs)), params)

    gen = torch.Generator().manual_seed(5)
    x = policy.initial_noise(2, gen)
    for i, t in enumerate(policy.schedule.timesteps(4)):
        t = t.expand(2)
        out = policy.predict(x, t)
        if i < 2:
            out = out.detach()
        x = policy.schedule.step(out, x, t, policy.schedule.prev_timesteps(t, 4), eta=1.0, generator=gen).prev_sample
    images = policy.decode(x)
    torch.testing.assert_close(images, pairs["images"])
    reference = torch.autograd.grad(-images.mean(dim=(1, 2, 3)).mean(), params)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_gradient_checkpointing_changes_memory_not_gradients(tiny_sd_path, tmp_path):
    grads = []
    for checkpointing in (True, False):
        torch.manual_seed(0)
        trainer = AlignPropTrainer(_config(tmp_path, truncation="draft_k", draft_k=4, sample_num_steps=4,
                                           gradient_checkpointing=checkpointing, run_name=f"ckpt{checkpointing}"),
                                   brightness, lambda: ("a cat", {}), DefaultDDPOStableDiffusionPipeline(tiny_sd_path))
        params = list(trainer.policy.trainable_parameters())
        pairs = trainer._generate_samples(2, generator=torch.Generator().manual_seed(3))
        grads.append(torch.autograd.grad(trainer.calculate_loss(trainer.compute_rewards(pairs)), params))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _fixed_seed_brightness(trainer, seed=1234):
    with torch.no_grad():
        pairs = trainer._generate_samples(8, with_grad=False, generator=torch.Generator().manual_seed(seed))
    return float(pairs["images"].mean())


def test_reward_rises_on_a_differentiable_reward(tiny_ddpm_path, tmp_path):
    trainer = AlignPropTrainer(_config(tmp_path, num_epochs=4, sample_num_steps=3, train_batch_size=4, train_lora=False,
                                       truncation="draft_k", draft_k=3, train_learning_rate=1e-2, save_freq=10,
                                       reward_coefficient=2.0),
                               brightness, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path, use_lora=False))
    before = _fixed_seed_brightness(trainer)
    trainer.train()
    after = _fixed_seed_brightness(trainer)
    assert after > before + 0.1, (before, after)  # about 0.48 -> 0.85
    metrics = logged_metrics(tmp_path)
    assert [m["epoch"] for m in metrics] == [0, 1, 2, 3]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and trainer.global_step == 4  # one update per epoch
    assert metrics[-1]["reward/mean"] > metrics[0]["reward/mean"]
    assert {"reward/mean", "reward/std", "loss/reward", "stats/grad_norm", "train/lr", "perf/epoch_s",
            "perf/samples_per_s", "truncation/grad_steps"} <= set(metrics[-1])
    assert metrics[0]["loss/reward"] == pytest.approx(-2.0 * metrics[0]["reward/mean"], rel=1e-5)
    assert metrics[-1]["truncation/grad_steps"] == 3


class JpegLikeReward:
    name = "jpeg_size"
    differentiable = False

    def __call__(self, images, prompts, metadata):  # pragma: no cover - must never be called
        raise AssertionError("sampled before refusing a non-differentiable reward")


def test_a_non_differentiable_reward_is_refused_before_anything_runs(tiny_ddpm_path, tmp_path):
    prompts_drawn = []

    def prompt_fn():
        prompts_drawn.append(1)
        return "", {}

    with pytest.raises(RewardError, match="jpeg_size.*differentiable=False") as err:
        AlignPropTrainer(_config(tmp_path), JpegLikeReward(), prompt_fn, DefaultDDPODDPMPipeline(tiny_ddpm_path))
    assert "DDPOTrainer" in str(err.value)
    assert not prompts_drawn and not (tmp_path / "logs").exists()


def test_rewards_without_gradients_name_the_function(tiny_ddpm_path, tmp_path):
    def numpy_reward(images, prompts, metadata):
        return images.detach().mean(dim=(1, 2, 3)).cpu().numpy(), {}

    trainer = AlignPropTrainer(_config(tmp_path, truncation="draft_k"), numpy_reward, lambda: ("", {}),
                               DefaultDDPODDPMPipeline(tiny_ddpm_path))
    with pytest.raises(RewardError, match="numpy_reward returned rewards without gradients"):
        trainer.train()


def test_resume_matches_an_uninterrupted_run(tiny_sd_path, tmp_path):
    def make(run_name, **kw):
        random.seed(0)
        torch.manual_seed(0)  # LoRA's random init happens when the pipeline is built
        pipe = DefaultDDPOStableDiffusionPipeline(tiny_sd_path)
        cfg = _config(tmp_path, num_epochs=3, sample_num_steps=3, run_name=run_name,
                      train_gradient_accumulation_steps=2, truncated_rand_backprop_minmax=(0, 3),
                      train_learning_rate=1e-2, **kw)
        return AlignPropTrainer(cfg, brightness, random_prompt, pipe)

    straight = make("straight")
    straight.train()
    interrupted, resumed = interrupt_and_resume(make, tmp_path, stop_after=2)
    assert interrupted.global_step == 2
    resumed.train()
    assert_same_run(straight, resumed, tmp_path)
    assert resumed.global_step == straight.global_step == 3


def test_trl_example_runs_unchanged_but_for_the_import(tiny_sd_path, tmp_path):
    # The structure of TRL's alignprop.py example and its doc's image hook (dict form).
    from PIL import Image

    seen = []

    def image_outputs_hook(image_data, global_step, accelerate_logger):
        result = {}
        images, prompts, rewards = [image_data["images"], image_data["prompts"], image_data["rewards"]]
        for i, image in enumerate(images):
            pil = Image.fromarray((image.cpu().numpy().transpose(1, 2, 0) * 255).astype(np.uint8))
            result[f"{prompts[i]:.25} | {rewards[i]:.2f}"] = [pil.resize((32, 32))]
        seen.append((global_step, type(accelerate_logger).__name__, len(result), sorted(image_data)))

    # TRL's defaults (truncated_backprop_rand=True, minmax (0, 50)) need 50 steps; a short run overrides the range.
    config = AlignPropConfig(num_epochs=2, sample_num_steps=3, train_batch_size=2,
                             truncated_rand_backprop_minmax=(0, 3), mixed_precision="no",
                             logdir=str(tmp_path / "logs"), log_image_freq=2)
    pipeline = DefaultDDPOStableDiffusionPipeline(tiny_sd_path, pretrained_model_revision="main", use_lora=True)
    trainer = AlignPropTrainer(config, brightness, random_prompt, pipeline, image_samples_hook=image_outputs_hook)
    assert config.truncation_strategy == "random"
    trainer.train()
    # Called every log_image_freq-th step with the tracker; without one (TRL raised IndexError) with a tracker
    # that saves the images in the run folder.
    assert seen == [(2, "ImageFolderTracker", 2, ["images", "prompt_metadata", "prompts", "rewards"])]
    trainer.push_to_hub  # noqa: B018 - part of TRL's surface
    trainer._save_pretrained(str(tmp_path / "final"))
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert "AlignProp" in (tmp_path / "final" / "README.md").read_text()
    assert list((tmp_path / "logs").iterdir())[0].name.startswith(config.exp_name)


def test_truncation_range_is_settable_from_the_command_line_and_checked(tiny_ddpm_path, tmp_path):
    config = load_config(None, ["trainer=alignprop", "truncated_rand_backprop_minmax=[1,3]", "sample_num_steps=3",
                                "mixed_precision=no", f"logdir={tmp_path / 'logs'}", "run_name=cli", "num_epochs=1",
                                "train_batch_size=1"])
    assert isinstance(config, AlignPropConfig) and tuple(config.truncated_rand_backprop_minmax) == (1, 3)
    trainer = AlignPropTrainer(config, brightness, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path))
    trainer.train()
    assert trainer.last_plan.first_grad_step in (1, 2)
    with pytest.raises(ConfigError, match="truncated_rand_backprop_minmax"):  # TRL's (0, 50) with 3 steps
        AlignPropTrainer(_config(tmp_path, sample_num_steps=3), brightness, lambda: ("", {}),
                         DefaultDDPODDPMPipeline(tiny_ddpm_path))


def test_two_process_alignprop_trains_in_sync_and_saves_without_hanging(tiny_ddpm_path, tmp_path):
    from .test_multiprocess import _launch

    ranks, _ = _launch("alignprop", tiny_ddpm_path, tmp_path / "logs", "num_epochs=2", "sample_num_steps=3",
                       "train_batch_size=1", "train_gradient_accumulation_steps=2", "truncation=draft_k", "draft_k=2",
                       "train_learning_rate=0.01")
    assert ranks[0]["num_processes"] == 2
    # Each process samples its own batches; the averaged gradients keep the weights identical.
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=0, abs=1e-9)
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 2
    run = tmp_path / "logs" / "mp"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint_0", "checkpoint_1"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (run / "checkpoints" / "checkpoint_1").iterdir()}
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and metrics[0]["perf/samples_per_s"] > 0  # logged once, by the main process
    assert (tmp_path / "logs" / "final" / "adapter_model.safetensors").is_file()


def test_registered_rewards_a_differentiable_one_trains_the_others_are_refused(tiny_sd_path, tmp_path):
    from diffrl import rewards
    from diffrl.testing.rewards import make_tiny_aesthetic_mlp, make_tiny_clip

    clip = str(make_tiny_clip(tmp_path / "clip"))
    mlp = str(make_tiny_aesthetic_mlp(tmp_path / "mlp.safetensors", input_size=16))
    pipe = DefaultDDPOStableDiffusionPipeline(tiny_sd_path)
    config = _config(tmp_path, num_epochs=1, sample_num_steps=3, truncation="draft_k", draft_k=2)
    for refused in (rewards.load("jpeg_compressibility"),
                    rewards.load("aesthetic", clip_model=clip, mlp=mlp, differentiable=False)):
        with pytest.raises(RewardError, match=f"'{refused.name}' declares differentiable=False"):
            AlignPropTrainer(config, refused, random_prompt, pipe)
    trainer = AlignPropTrainer(config, rewards.load("aesthetic", clip_model=clip, mlp=mlp), random_prompt, pipe)
    before = trainable_weights(trainer)
    trainer.train()
    after = trainable_weights(trainer)
    assert any(float((after[n] - before[n]).abs().max()) > 0 for n in before)
    assert np.isfinite(trainer.last_metrics["reward/mean"])
