"""Nothing lost, nothing leaked, nothing silent (issue 12): divergence, secrets, resume, records."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from diffrl import DDPOConfig, DDPOTrainer, DefaultDDPODDPMPipeline
from diffrl.config import ConfigError
from diffrl.recipes.guard import DivergenceError
from diffrl.recipes.records import MetricsLogger


def noise_reward(images, prompts, metadata):
    """Ignores the pixels: rewards that differ, so advantages are not zero."""
    return torch.arange(images.shape[0], dtype=torch.float32), {}


def brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


def _config(tmp_path, **kw):
    base = dict(num_epochs=3, sample_num_steps=3, sample_batch_size=4, sample_num_batches_per_epoch=1,
                train_batch_size=2, train_gradient_accumulation_steps=1, mixed_precision="no",
                logdir=str(tmp_path / "logs"), run_name="run", seed=3, save_freq=1, train_learning_rate=1e-3)
    base.update(kw)
    return DDPOConfig(**base)


def _all_finite_files(root) -> list[str]:
    """Every safetensors file under ``root`` that holds a non-finite number."""
    bad = []
    for path in root.rglob("*.safetensors"):
        if any(not torch.isfinite(t).all() for t in load_file(path).values() if t.is_floating_point()):
            bad.append(str(path))
    return bad


def test_a_diverging_run_stops_with_the_named_error_and_writes_nothing_non_finite(tiny_ddpm_path, tmp_path):
    config = _config(tmp_path, train_learning_rate=1e9, num_checkpoint_limit=1, train_max_grad_norm=float("inf"))
    trainer = DDPOTrainer(config, noise_reward, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path))
    with pytest.raises(DivergenceError, match=r"diverged at epoch \d+.*train_learning_rate=1e\+09"):
        trainer.train()
    # The guard stops before the update that would make the weights non-finite: what can still be saved is the
    # last finite state.
    trainer.save_pretrained(str(tmp_path / "logs" / "final"))
    assert _all_finite_files(tmp_path / "logs") == []


def test_non_finite_weights_are_never_saved(tiny_ddpm_path, tmp_path):
    trainer = DDPOTrainer(_config(tmp_path, num_epochs=1), brightness, lambda: ("", {}),
                          DefaultDDPODDPMPipeline(tiny_ddpm_path))
    with torch.no_grad():
        next(iter(trainer.policy.trainable_parameters())).fill_(float("nan"))
    with pytest.raises(DivergenceError, match="sampled images|weights are not finite"):
        trainer.train()
    with pytest.raises(DivergenceError, match="weights are not finite"):
        trainer.save_pretrained(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()
    assert _all_finite_files(tmp_path / "logs") == []


def test_the_cli_reports_divergence_in_one_line(tmp_path):
    cmd = [sys.executable, "-m", "diffrl.cli", "train", "train_learning_rate=1e9", "save_freq=1", "num_epochs=2",
           "sample_batch_size=16", "train_batch_size=16", "eval_every=0", "eval_num_samples=16",
           f"logdir={tmp_path / 'logs'}", "run_name=boom"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error"))
    errors = [line for line in out.stderr.splitlines() if line.startswith("diffrl train:")]
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(errors) == 1 and "diverged" in errors[0], out.stderr[-2000:]
    assert _all_finite_files(tmp_path / "logs") == []


def _metrics_epochs(run_dir) -> list[int]:
    return [int(json.loads(line)["epoch"]) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_kills_and_resumes_leave_exactly_one_metrics_line_per_epoch(tiny_ddpm_path, tmp_path, monkeypatch):
    pipe = lambda: DefaultDDPODDPMPipeline(tiny_ddpm_path)  # noqa: E731
    real_log = MetricsLogger.log
    # A kill between the checkpoint's commit and the metrics line, at epoch 1.
    def dying_log(self, metrics, step):
        if metrics["epoch"] == 1:
            raise KeyboardInterrupt
        real_log(self, metrics, step)

    monkeypatch.setattr(MetricsLogger, "log", dying_log)
    with pytest.raises(KeyboardInterrupt):
        DDPOTrainer(_config(tmp_path), brightness, lambda: ("", {}), pipe()).train()
    run = tmp_path / "logs" / "run"
    assert _metrics_epochs(run) == [0]
    # A second kill mid-epoch 2 (after epoch 2's line would have been written by a save_freq=2 run).
    monkeypatch.setattr(MetricsLogger, "log", real_log)
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 99, "epoch": 2, "reward/mean": 0.0}) + "\n{\"torn")  # a line past the checkpoint
    # A dead process's hidden leftovers.
    (run / "checkpoints" / ".checkpoint_5.tmp-999999").mkdir()
    (run / "checkpoints" / ".checkpoint_0.del-999998").mkdir()
    resumed = DDPOTrainer(_config(tmp_path, resume_from=str(run)), brightness, lambda: ("", {}), pipe())
    resumed.train()
    assert _metrics_epochs(run) == [0, 1, 2]
    assert not list((run / "checkpoints").glob(".*"))


def test_resume_with_a_new_learning_rate_trains_at_it_and_keeps_both_configs(tiny_ddpm_path, tmp_path):
    pipe = lambda: DefaultDDPODDPMPipeline(tiny_ddpm_path)  # noqa: E731
    DDPOTrainer(_config(tmp_path, num_epochs=1), brightness, lambda: ("", {}), pipe()).train()
    run = tmp_path / "logs" / "run"
    resumed = DDPOTrainer(_config(tmp_path, num_epochs=2, train_learning_rate=0.5, resume_from=str(run)),
                          brightness, lambda: ("", {}), pipe())
    assert {g["lr"] for g in resumed.optimizer.param_groups} == {0.5}
    assert "train_learning_rate: 0.001" in (run / "config.yaml").read_text()
    assert "train_learning_rate: 0.5" in (run / "config.resume-0.yaml").read_text()
    resumed.train()
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["train/lr"] == 0.5
    with pytest.raises(ConfigError, match="sample_batch_size.*cannot change mid-run"):
        DDPOTrainer(_config(tmp_path, num_epochs=3, sample_batch_size=8, resume_from=str(run)), brightness,
                    lambda: ("", {}), pipe())


def test_a_reward_token_appears_in_no_file_the_run_writes(tiny_ddpm_path, tmp_path, monkeypatch):
    secret = "tok-3f9a7c1e-never-write-me"
    monkeypatch.setenv("MY_REWARD_TOKEN", secret)
    seen = {}

    def reward(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3)), {}

    config = _config(tmp_path, num_epochs=1, reward_options={"token": secret, "url": f"http://u:{secret}@h:1"})
    trainer = DDPOTrainer(config, reward, lambda: ("", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path))
    seen["token"] = trainer.config.reward_options["token"]
    trainer.train()
    trainer.save_pretrained(str(tmp_path / "logs" / "run" / "final"))
    card = trainer.create_model_card()
    assert seen["token"] == secret  # redaction never changes the value the run uses
    for path in (tmp_path / "logs").rglob("*"):
        if path.is_file() and path.suffix not in {".safetensors", ".pt", ".png"}:
            assert secret not in path.read_text(errors="ignore"), path
    assert secret not in str(card)


def test_a_full_disk_during_a_checkpoint_names_the_path_and_keeps_the_last_one(tiny_ddpm_path, tmp_path, monkeypatch):
    from diffrl.recipes.checkpoints import CheckpointWriteError

    trainer = DDPOTrainer(_config(tmp_path, num_epochs=2), brightness, lambda: ("", {}),
                          DefaultDDPODDPMPipeline(tiny_ddpm_path))
    trainer.train(epochs=1)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # what torch.save raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint_1 .*unexpected pos.*checkpoint_0, is intact"):
        trainer.train()
    monkeypatch.setattr(torch, "save", real_save)
    checkpoints = tmp_path / "logs" / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_0"]
    assert _metrics_epochs(tmp_path / "logs" / "run") == [0]
