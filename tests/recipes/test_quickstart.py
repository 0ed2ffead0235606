import json

import pytest
import torch
from PIL import Image

from diffrl.commands.quickstart import run_quickstart

REDUCED = ["num_epochs=1", "sample_num_steps=4", "eval_num_samples=16", "save_freq=1"]


def _check_run(run, capsys):
    for name in ("grid_before_after.png", "reward_curve.png", "metrics.jsonl", "summary.json", "config.yaml"):
        assert (run / name).is_file(), name
    assert Image.open(run / "grid_before_after.png").size[0] > 100
    report = (run / "report.html").read_text(encoding="utf-8")
    assert "Samples from the same noise" in report and "Training curves" in report and "config.yaml" in report
    summary = json.loads((run / "summary.json").read_text())
    assert {"target_share_before", "target_share_after", "seconds", "reward_before", "reward_after"} <= set(summary)
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(run / "final")
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 8, 8, 1)
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1] == f"run folder: {run}"
    return summary


def test_quickstart_ddpo_leaves_its_artefacts(tmp_path, capsys):
    assert run_quickstart([*REDUCED, "sample_batch_size=8", "sample_num_batches_per_epoch=1", "train_batch_size=8",
                           f"logdir={tmp_path}", "run_name=q"]) == 0
    summary = _check_run(tmp_path / "q", capsys)
    assert summary["target_digit"] == 3 and 0 <= summary["target_share_before"] <= 1
    lines = (tmp_path / "q" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["epoch"] == 0


def test_a_quickstart_stopped_early_says_so_and_counts_the_epochs_it_ran(tmp_path, capsys):
    assert run_quickstart(["num_epochs=3", "sample_num_steps=4", "eval_num_samples=16", "sample_batch_size=8",
                           "sample_num_batches_per_epoch=1", "train_batch_size=8", "eval_every=1",
                           "stop_below={eval/diversity: 10.0}", f"logdir={tmp_path}", "run_name=s"]) == 0
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["epochs"] == 1 and "fell below 10 (stop_below)" in summary["stopped"]
    assert "for 1 epochs (stopped early: eval/diversity=" in capsys.readouterr().out


def test_quickstart_switches_to_alignprop_with_one_option(tmp_path, capsys):
    assert run_quickstart(["trainer=alignprop", *REDUCED, "train_batch_size=4", "train_gradient_accumulation_steps=1",
                           f"logdir={tmp_path}", "run_name=a"]) == 0
    summary = _check_run(tmp_path / "a", capsys)
    assert summary["trainer"] == "AlignPropTrainer"


def test_quickstart_switches_to_jpeg_with_one_option(tmp_path, capsys):
    assert run_quickstart(["reward=jpeg_compressibility", *REDUCED, "sample_batch_size=8",
                           "sample_num_batches_per_epoch=1", "train_batch_size=8", f"logdir={tmp_path}",
                           "run_name=j"]) == 0
    summary = _check_run(tmp_path / "j", capsys)
    assert summary["target_digit"] is None and summary["reward_before"] < 0


def test_diffrl_train_without_a_file_but_with_a_model_trains_that_model_not_the_quickstart(tiny_sd_path, tmp_path,
                                                                                          capsys):
    from diffrl.cli import main

    assert main(["train", f"model={tiny_sd_path}", "reward=jpeg_compressibility", "prompts=simple_animals",
                 "num_epochs=1", "sample_num_steps=2", "sample_batch_size=2", "sample_num_batches_per_epoch=1",
                 "train_batch_size=2", "mixed_precision=no", "run_name=sd", f"logdir={tmp_path / 'logs'}"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "logs" / "sd"
    assert "digits" not in out and "DDPMPipeline" not in out and f"fine-tuned model: {run / 'final'}" in out
    assert f"trained DDPOTrainer on {tiny_sd_path} (a Stable Diffusion model, LoRA rank 4, alpha 4) for 1 epochs" in out
    assert not (run / "summary.json").exists()  # the quickstart's artefact
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
    config = (run / "config.yaml").read_text()
    assert f"model: {tiny_sd_path}" in config and "sample_guidance_scale: 5.0" in config  # TRL's default, not 1


def test_a_reward_with_a_credential_still_gets_its_report_and_summary(tmp_path, capsys, monkeypatch):
    """The report after training scores with the live config: the run record holds the credential redacted."""
    from diffrl import rewards

    secret = "tok-only-in-memory"

    def guarded_digit(token: str, digit: int = 3):
        if token != secret:
            raise PermissionError(f"HTTP 403 wrong token {token!r}")
        return rewards.load("digit", digit=digit)

    monkeypatch.setitem(rewards.REWARDS.factories, "guarded_digit", guarded_digit)
    assert run_quickstart([*REDUCED, f"logdir={tmp_path}", "run_name=q", "reward=guarded_digit",
                           f"reward_options.token={secret}"]) == 0
    run = tmp_path / "q"
    assert (run / "summary.json").is_file() and (run / "report.html").is_file()
    assert "token: '***'" in (run / "config.yaml").read_text()

    from diffrl.evaluate.inputs import EvaluationError
    from diffrl.evaluate.runs import compare_run

    with pytest.raises(EvaluationError, match=r"reward_options.token is a credential.*\$\{env:NAME\}"):
        compare_run(run)  # diffrl report RUN later: the record cannot rebuild it, and says how to
