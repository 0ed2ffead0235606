import json
import random

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from diffrl import DefaultDDPODDPMPipeline, DefaultDDPOStableDiffusionPipeline, NFTConfig, NFTTrainer
from diffrl.algorithms import EMA_SCHEDULES, EMASchedule
from diffrl.commands.quickstart import run_quickstart
from diffrl.config import ConfigError
from diffrl.recipes.nft import OLD_POLICY_FILE
from diffrl.seeding import image_generator

from .helpers import assert_same_run, interrupt_and_resume, logged_metrics, trainable_weights


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


def constant(images, prompts, metadata):
    return torch.ones(images.shape[0]), {}


def random_prompt():
    return random.choice(["a cat", "a dog", "a fox"]), {"source": "test"}


def _config(tmp_path, **kw):
    base = dict(num_epochs=2, sample_num_steps=3, sample_batch_size=4, sample_num_batches_per_epoch=2,
                train_batch_size=4, group_size=2, mixed_precision="no", logdir=str(tmp_path / "logs"), run_name="run",
                train_learning_rate=3e-3, seed=1)
    base.update(kw)
    return NFTConfig(**base)


def _sd_trainer(tiny_sd_path, tmp_path, reward=brightness, **kw):
    random.seed(0)
    torch.manual_seed(0)  # LoRA's random init happens when the pipeline is built
    return NFTTrainer(_config(tmp_path, **kw), reward, random_prompt, DefaultDDPOStableDiffusionPipeline(tiny_sd_path))


def _ddpm_trainer(tiny_ddpm_path, tmp_path, reward=brightness, use_lora=True, **kw):
    return NFTTrainer(_config(tmp_path, train_lora=use_lora, **kw), reward, lambda: ("", {}),
                      DefaultDDPODDPMPipeline(tiny_ddpm_path, use_lora=use_lora))


@pytest.mark.parametrize("kind", ["sd_lora", "ddpm_full_old_on_cpu"])
def test_gradients_reach_only_the_trained_weights(tiny_sd_path, tiny_ddpm_path, tmp_path, kind):
    if kind == "sd_lora":
        trainer = _sd_trainer(tiny_sd_path, tmp_path, nft_kl_coef=0.5)
    else:
        trainer = _ddpm_trainer(tiny_ddpm_path, tmp_path, use_lora=False, nft_kl_coef=0.5, nft_old_policy_on_cpu=True)
        assert all(v.device.type == "cpu" for v in trainer.recipe.old.values())
    samples, _ = trainer.recipe.optimality(trainer.recipe.sample_epoch(0, 0)[0])
    with torch.no_grad():  # move the old policy away from the current weights so both loss branches differ
        for v in trainer.recipe.old.values():
            v.add_(0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3)))
    t = trainer.recipe.train_timestep_grid()[:1].expand(samples.x0.shape[0])
    noise = torch.randn(samples.x0.shape, generator=torch.Generator().manual_seed(4))
    loss, stats = trainer.recipe.compute_loss(samples, t, noise)
    loss.backward()
    unet = trainer.policy.trainable_module
    trained = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    assert set(trained) == set(trainer.recipe.old)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in trained.values())
    assert all(p.grad is not None for p in trained.values())
    assert all(p.grad is None for p in frozen)
    if kind == "sd_lora":
        assert frozen and all(p.grad is None for m in trainer.policy._frozen_modules() for p in m.parameters())
    assert all(not v.requires_grad and v.grad is None for v in trainer.recipe.old.values())
    assert float(stats.kl_ref) >= 0 and float(stats.old_deviation) > 0


def test_equal_old_and_current_weights_with_r_one_half_give_no_update(tiny_sd_path, tmp_path):
    # A constant reward makes every advantage 0, so every r = 0.5; at epoch 0 the old policy is the current one
    # (and, with LoRA's zero-initialised up-projections, the reference too): the gradient must vanish exactly.
    trainer = _sd_trainer(tiny_sd_path, tmp_path, reward=constant, num_epochs=1, nft_kl_coef=0.1,
                          train_adam_weight_decay=0.0)
    before = trainable_weights(trainer)
    trainer.train()
    after = trainable_weights(trainer)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    row = logged_metrics(tmp_path)[-1]
    assert row["stats/optimality_mean"] == 0.5 and row["stats/grad_norm"] == 0.0
    assert row["loss/policy"] > 0  # the loss itself is not zero, only its gradient


def test_brightness_reward_changes_the_weights_and_logs_nft_metrics(tiny_ddpm_path, tmp_path):
    trainer = _ddpm_trainer(tiny_ddpm_path, tmp_path, train_timestep_fraction=0.7)
    before = trainable_weights(trainer)
    trainer.train()
    after = trainable_weights(trainer)
    assert any((after[n] - before[n]).abs().max() > 0 for n in before)
    metrics = logged_metrics(tmp_path)
    assert [m["epoch"] for m in metrics] == [0, 1]
    assert {"reward/mean", "loss/policy", "loss/positive", "loss/negative", "stats/old_deviation",
            "stats/ema_decay", "stats/grad_norm", "perf/samples_per_s"} <= set(metrics[-1])
    # 8 samples / batch 4 = 2 optimizer steps per epoch (the 2 timesteps of each minibatch accumulate)
    assert trainer.global_step == 4
    assert (tmp_path / "logs" / "run" / "checkpoints" / "checkpoint_1" / OLD_POLICY_FILE).is_file()


def test_the_old_policy_follows_the_ema_schedule(tiny_ddpm_path, tmp_path):
    assert _ddpm_trainer(tiny_ddpm_path, tmp_path / "w", nft_ema_schedule="warm_start").recipe.ema_schedule \
        is EMA_SCHEDULES["warm_start"]
    trainer = _ddpm_trainer(tiny_ddpm_path, tmp_path, num_epochs=3)
    trainer.recipe.ema_schedule = EMASchedule(rate=0.25, max_decay=0.6)  # steps 2, 4, 6 -> decays 0.5, 0.6, 0.6
    old = {n: v.clone() for n, v in trainer.recipe.old.items()}
    assert all(torch.equal(old[n], trainable_weights(trainer)[n]) for n in old)  # starts as the current weights
    step = 0
    for epoch in range(3):
        step = trainer.step(epoch, step)
        decay = min(0.25 * step, 0.6)
        current = trainable_weights(trainer)
        expected = {n: decay * old[n] + (1 - decay) * current[n] for n in old}
        for name in old:
            torch.testing.assert_close(trainer.recipe.old[name], expected[name], rtol=0, atol=1e-6)
        assert any((trainer.recipe.old[n] - current[n]).abs().max() > 1e-5 for n in old)  # it lags behind
        old = {n: v.clone() for n, v in trainer.recipe.old.items()}
    assert [m["stats/ema_decay"] for m in logged_metrics(tmp_path)] == [0.5, 0.6, 0.6]


def test_resume_matches_an_uninterrupted_run(tiny_sd_path, tmp_path):
    def make(run_name, **kw):
        return _sd_trainer(tiny_sd_path, tmp_path, num_epochs=3, run_name=run_name, sample_num_steps=2,
                           sample_num_batches_per_epoch=1, nft_kl_coef=0.1, **kw)

    straight = make("straight")
    straight.train()
    interrupted, resumed = interrupt_and_resume(make, tmp_path, stop_after=2)
    for name, value in interrupted.recipe.old.items():  # the old policy came back from the checkpoint
        torch.testing.assert_close(resumed.recipe.old[name], value, rtol=0, atol=0)
    resumed.train()
    assert_same_run(straight, resumed, tmp_path)
    for name in straight.recipe.old:
        torch.testing.assert_close(straight.recipe.old[name], resumed.recipe.old[name], rtol=0, atol=1e-6)


def test_dpm_solver_samples_match_diffusers_and_train(tiny_ddpm_path, tmp_path):
    trainer = _ddpm_trainer(tiny_ddpm_path, tmp_path, nft_sampler="dpmsolver++", sample_num_steps=4)
    x0, cond = trainer.recipe.sample_x0(["", ""], image_generator(5))
    assert cond is None and x0.shape == (2, *trainer.policy._latent_shape(2)[1:])
    # the same solve written against diffusers directly (the UNet at its initial weights = the old policy)
    policy = trainer.policy
    scheduler = DPMSolverMultistepScheduler.from_config(policy.pipeline.scheduler.config, steps_offset=1,
                                                        algorithm_type="dpmsolver++", solver_order=2)
    scheduler.set_timesteps(4)
    x = policy.initial_noise(2, image_generator(5))
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(policy.trainable_module(x, t).sample, t, x).prev_sample
    torch.testing.assert_close(x0, x, rtol=1e-4, atol=1e-5)
    grid = trainer.recipe.train_timestep_grid()
    assert torch.equal(grid, scheduler.timesteps)
    trainer.train()
    assert logged_metrics(tmp_path)[-1]["epoch"] == 1


def test_stochastic_samplers_run(tiny_ddpm_path, tmp_path):
    for sampler, extra in (("ddim", {"sample_eta": 1.0}), ("ddpm", {})):
        trainer = _ddpm_trainer(tiny_ddpm_path, tmp_path / sampler, nft_sampler=sampler, num_epochs=1, **extra)
        a = trainer.recipe.sample_x0(["", ""], image_generator(1))[0]
        b = trainer.recipe.sample_x0(["", ""], image_generator(1))[0]
        c = trainer.recipe.sample_x0(["", ""], image_generator(2))[0]
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_settings_fail_before_training(tiny_sd_path, tiny_ddpm_path, tmp_path):
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, nft_sampler="dpmsolver++", sample_eta=0.5, nft_beta=0.0, nft_old_policy_on_cpu=True,
                train_batch_size=3).validate()
    text = str(err.value)
    for name in ("sample_eta", "nft_beta", "nft_old_policy_on_cpu", "train_batch_size"):
        assert name in text
    with pytest.raises(ValueError, match="group_size=1"):
        _sd_trainer(tiny_sd_path, tmp_path, group_size=1)


def test_diffrl_train_trainer_nft_runs_the_digits_preset(tmp_path, capsys):
    assert run_quickstart(["trainer=nft", "num_epochs=1", "sample_num_steps=4", "eval_num_samples=16",
                           "sample_batch_size=8", "sample_num_batches_per_epoch=1", "train_batch_size=8",
                           "save_freq=1", f"logdir={tmp_path}", "run_name=n"]) == 0
    run = tmp_path / "n"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainer"] == "NFTTrainer" and summary["target_digit"] == 3
    assert (run / "final" / "diffusion_pytorch_model.safetensors").is_file() or (run / "final" / "unet").is_dir()
    assert (run / "checkpoints" / "checkpoint_0" / OLD_POLICY_FILE).is_file()


TWO_PROCESS_JOB = '''
import json, sys
from pathlib import Path
import torch
from diffrl import DefaultDDPODDPMPipeline, NFTTrainer
from diffrl.config import load_config

def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}

model, logdir, *overrides = sys.argv[1:]
config = load_config(None, ["trainer=nft", f"logdir={logdir}", "run_name=mp", "mixed_precision=no", *overrides])
torch.manual_seed(0)  # the same LoRA init on every process
trainer = NFTTrainer(config, brightness, lambda: ("", {}), DefaultDDPODDPMPipeline(model))
samples, all_rewards = trainer.recipe.optimality(trainer.recipe.sample_epoch(0, 0)[0])
trainer.train()
rank = trainer.accelerator.process_index
Path(logdir, f"rank_{rank}.json").write_text(json.dumps({
    "num_processes": trainer.accelerator.num_processes, "rewards": all_rewards.tolist(), "r": samples.r.tolist(),
    "weights": [p.detach().double().sum().item() for p in trainer.policy.trainable_parameters()],
    "old": [v.double().sum().item() for v in trainer.recipe.old.values()], "global_step": trainer.global_step}))
'''


@pytest.mark.slow
def test_two_processes_share_one_group_and_stay_in_sync(tiny_ddpm_path, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from diffrl.algorithms import advantages_to_optimality, group_advantages

    job = tmp_path / "job.py"
    job.write_text(TWO_PROCESS_JOB)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logdir = tmp_path / "logs"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(job), tiny_ddpm_path, str(logdir), "num_epochs=2", "sample_num_steps=3",
           "sample_batch_size=2", "sample_num_batches_per_epoch=1", "train_batch_size=1",
           "train_learning_rate=0.01"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                         env=dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    ranks = [json.loads((logdir / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["num_processes"] == 2 and ranks[0]["rewards"] == ranks[1]["rewards"]
    # the unconditional epoch is one group over both processes: r of the 4 gathered rewards, split by rank
    rewards = torch.tensor(ranks[0]["rewards"])
    expected = advantages_to_optimality(group_advantages(rewards, torch.zeros(4, dtype=torch.long), clip=5.0), 5.0)
    torch.testing.assert_close(torch.tensor(ranks[0]["r"] + ranks[1]["r"]), expected)
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=0, abs=1e-9)  # gradients synchronised
    assert ranks[0]["old"] == pytest.approx(ranks[1]["old"], rel=0, abs=1e-9)
    assert ranks[0]["global_step"] == ranks[1]["global_step"] > 0
