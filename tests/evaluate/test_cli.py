"""``diffrl sample``, ``diffrl evaluate`` and ``diffrl report`` end to end on tiny models, and their errors."""

from __future__ import annotations

import json

from PIL import Image

from diffrl.cli import main


def test_help_lists_the_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "sample" in out and "evaluate" in out and "report" in out


def test_sample_writes_pngs_grid_and_index(tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(["sample", tiny_sd_path, "--prompts", "a cat", "a dog", "--seeds", "0", "5", "--steps", "2",
                 "--out", str(out)]) == 0
    index = json.loads((out / "index.json").read_text())
    assert [(s["prompt"], s["seed"], s["file"]) for s in index["samples"]] == [
        ("a cat", 0, "p000_s0.png"), ("a cat", 5, "p000_s5.png"),
        ("a dog", 0, "p001_s0.png"), ("a dog", 5, "p001_s5.png")]
    assert index["settings"]["num_inference_steps"] == 2 and index["model"]["lora"] is False
    assert Image.open(out / "p001_s5.png").size == (16, 16)
    assert Image.open(out / "grid.png").size[0] > 2 * 48
    assert "wrote 4 images" in capsys.readouterr().out


def test_sample_lora_result_and_base_override(lora_run, tiny_ddpm_path, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["sample", str(lora_run / "final"), "--num-seeds", "2", "--steps", "2", "--out", str(a)]) == 0
    assert main(["sample", str(lora_run), "--base", tiny_ddpm_path, "--num-seeds", "2", "--steps", "2",
                 "--out", str(b)]) == 0  # a run folder means its final/
    assert json.loads((a / "index.json").read_text())["model"]["lora"] is True
    assert (a / "p000_s1.png").read_bytes() == (b / "p000_s1.png").read_bytes()


def test_sample_errors_name_the_setting(tiny_sd_path, tiny_ddpm_path, tmp_path, capsys):
    assert main(["sample", str(tmp_path / "missing" / "model"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["sample", tiny_sd_path, "--out", str(tmp_path / "o")]) == 2
    assert "give --prompts or --prompt-source" in capsys.readouterr().err
    assert main(["sample", tiny_ddpm_path, "--base", tiny_sd_path, "--out", str(tmp_path / "o")]) == 2
    assert "not a diffrl LoRA result" in capsys.readouterr().err
    assert main(["sample", tiny_ddpm_path, "--seeds", "1", "1", "--out", str(tmp_path / "o")]) == 2
    assert "repeats a seed" in capsys.readouterr().err


def test_evaluate_writes_results_report_and_images(lora_run, tiny_ddpm_path, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--base", tiny_ddpm_path, "--model", str(lora_run / "final"), "--model", tiny_ddpm_path,
                 "--name", "tuned", "copy", "--reward", "jpeg_compressibility", "--reward", "jpeg_incompressibility",
                 "--reward-option", "jpeg_compressibility.quality=90", "--trained-reward", "jpeg_compressibility",
                 "--num-seeds", "3", "--steps", "2", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["base", "tuned", "copy"]
    assert results["models"][1]["lora"] is True and results["rewards"][0] == {
        "name": "jpeg_compressibility", "options": {"quality": 90}, "trained": True}
    copy = results["versus_baseline"]["copy"]["train"]
    assert copy["reward/jpeg_compressibility"]["mean"] == 0 and copy["diversity"]["mean"] == 0
    assert results["versus_baseline"]["tuned"]["train"]["reward/jpeg_compressibility"]["mean"] != 0
    assert results["run_dirs"] == {"tuned": str(lora_run)}
    first = results["samples"]["tuned"][0]
    assert (out / first["file"]).is_file() and first["file"] == "images/tuned/p000_s0.png"
    report = (out / "report.html").read_text()
    assert "data:image/png;base64," in report and 'alt="reward/mean"' in report
    printed = capsys.readouterr().out
    assert "reward/jpeg_compressibility" in printed and "tuned - base" in printed


def test_evaluate_checks_settings_before_loading(tiny_ddpm_path, tmp_path, capsys):
    base = ["evaluate", "--base", tiny_ddpm_path, "--out", str(tmp_path / "o")]
    assert main([*base, "--reward", "jpeg_compresibility"]) == 2
    err = capsys.readouterr().err
    assert "unknown reward 'jpeg_compresibility'" in err and "jpeg_compressibility" in err
    assert main([*base, "--reward", "digit", "--reward-option", "aesthetic.dtype=bf16"]) == 2
    assert "add --reward aesthetic" in capsys.readouterr().err
    assert main([*base, "--reward", "digit", "--reward-option", "digit.digt=3"]) == 2
    assert "did you mean 'digit'" in capsys.readouterr().err
    assert main([*base, "--reward", "digit", "--model", str(tmp_path / "nope" / "final")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main([*base, "--reward", "digit", "--prompts", "a", "--heldout-prompts", "a"]) == 2
    assert "must be unseen" in capsys.readouterr().err
    assert main([*base, "--reward", "digit", "--trained-reward", "aesthetic"]) == 2
    assert "--trained-reward aesthetic" in capsys.readouterr().err


def test_report_for_a_training_run(lora_run, tmp_path, capsys):
    assert main(["report", str(lora_run), "--seeds", "0", "1", "--steps", "2", "--out", str(tmp_path / "r.html")]) == 0
    text = (tmp_path / "r.html").read_text()
    assert "Samples from the same noise" in text and "Training curves" in text and "config.yaml" in text
    assert main(["report", str(lora_run), "--no-samples", "--out", str(tmp_path / "n.html")]) == 0
    assert "Samples from the same noise" not in (tmp_path / "n.html").read_text()
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_evaluate_measures_diversity_with_the_clip_of_a_clip_reward(tiny_sd_path, tmp_path):
    from diffrl import rewards
    from diffrl.evaluate.features import ClipFeatures, PixelFeatures, image_features
    from diffrl.testing.rewards import make_tiny_clip

    clip = str(make_tiny_clip(tmp_path / "clip"))
    scored = {"jpeg_compressibility": rewards.load("jpeg_compressibility"),
              "clip_score": rewards.load("clip_score", model=clip)}
    assert isinstance(image_features("auto", {"jpeg_compressibility": scored["jpeg_compressibility"]}), PixelFeatures)
    assert isinstance(image_features("pixels", scored), PixelFeatures)
    auto = image_features("auto", scored)
    assert isinstance(auto, ClipFeatures) and auto.model == clip and auto.processor == clip
    out = tmp_path / "eval"
    assert main(["evaluate", "--base", tiny_sd_path, "--reward", "clip_score", "--reward-option",
                 f"clip_score.model={json.dumps(clip)}", "--prompts", "a cat", "a dog", "--num-seeds", "3",
                 "--steps", "2", "--no-images", "--out", str(out)]) == 0
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["features"] == f"clip:{clip}" and settings["feature_metric"] == "cosine"
    assert "diversity (clip:" in (out / "report.html").read_text()


def test_evaluate_loads_training_checkpoints(tiny_ddpm_path, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"""
trainer: ddpo
model: {tiny_ddpm_path}
reward: jpeg_compressibility
mixed_precision: "no"
num_epochs: 2
sample_num_steps: 2
sample_batch_size: 2
sample_num_batches_per_epoch: 1
train_batch_size: 2
train_learning_rate: 0.01
logdir: {tmp_path / 'logs'}
run_name: run
""")
    assert main(["train", str(config)]) == 0
    run = tmp_path / "logs" / "run"
    out = tmp_path / "eval"
    assert main(["evaluate", "--base", tiny_ddpm_path, "--model", str(run / "checkpoints" / "checkpoint_0"),
                 "--model", str(run / "checkpoints" / "checkpoint_1"), "--model", str(run / "final"),
                 "--reward", "jpeg_compressibility", "--num-seeds", "3", "--steps", "2", "--no-images",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(m["name"], m.get("checkpoint_epoch"), m["lora"]) for m in results["models"][1:]] == [
        ("run/checkpoint_0", 0, True), ("run/checkpoint_1", 1, True), ("run/final", None, True)]
    per_image = {m: [s["rewards"]["jpeg_compressibility"] for s in results["samples"][m]]
                 for m in ("base", "run/checkpoint_0", "run/checkpoint_1", "run/final")}
    assert per_image["run/checkpoint_1"] == per_image["run/final"]  # the last checkpoint is the final model
    assert per_image["run/checkpoint_0"] != per_image["run/final"] != per_image["base"]
    assert results["run_dirs"] == {"run/checkpoint_0": str(run)}  # the run's curves once
