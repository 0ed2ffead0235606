"""``diffrl sample``, ``diffrl evaluate`` and ``diffrl report`` on Stable Diffusion XL results: a LoRA run trained by
``diffrl train`` on the tiny SDXL (its final/ and its checkpoints) and a full fine-tuned SDXL pipeline folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffrl.cli import main
from diffrl.evaluate.loading import load_model
from diffrl.pipelines import StableDiffusionXLPolicy
from diffrl.seeding import sample_on_seeds
from diffrl.testing.sdxl import save_tiny_sdxl

PROMPTS = ["a cat", "a dog"]


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return str(save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl")))


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl, tmp_path_factory):
    """A finished two-epoch LoRA DDPO run on the tiny SDXL: config.yaml, metrics.jsonl, checkpoints/, final/."""
    root = tmp_path_factory.mktemp("sdxl-run")
    config = root / "run.yaml"
    config.write_text(f"""
trainer: ddpo
model: {tiny_sdxl}
reward: jpeg_compressibility
prompts: fixed
prompt_options: {{prompts: {json.dumps(PROMPTS)}}}
mixed_precision: "no"
num_epochs: 2
sample_num_steps: 2
sample_guidance_scale: 4.0
sample_batch_size: 2
sample_num_batches_per_epoch: 1
train_batch_size: 2
train_learning_rate: 0.05
train_clip_range: 0.2
lora_rank: 2
lora_alpha: 2
logdir: {root / 'logs'}
run_name: run
""")
    assert main(["train", str(config)]) == 0
    return root / "logs" / "run"


@pytest.fixture(scope="module")
def sdxl_full(tiny_sdxl, tmp_path_factory):
    """A full fine-tuned SDXL result: the whole pipeline folder, with its UNet perturbed."""
    policy = StableDiffusionXLPolicy.from_pretrained(tiny_sdxl, use_lora=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in policy.trainable_parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    out = tmp_path_factory.mktemp("sdxl-full") / "full"
    policy.save_pretrained(out)
    return str(out)


def _pixels(folder, name):
    return np.asarray(Image.open(folder / name), dtype=np.int16)


def test_sample_sdxl_lora_result_is_the_trained_policy(sdxl_run, tiny_sdxl, tmp_path):
    tuned, base = tmp_path / "tuned", tmp_path / "base"
    args = ["--prompts", *PROMPTS, "--seeds", "0", "3", "--steps", "2", "--guidance", "4.0"]
    assert main(["sample", str(sdxl_run), *args, "--out", str(tuned)]) == 0  # a run folder means its final/
    assert main(["sample", tiny_sdxl, *args, "--out", str(base)]) == 0
    index = json.loads((tuned / "index.json").read_text())
    assert index["model"]["kind"] == "sdxl" and index["model"]["lora"] is True
    assert index["model"]["base_model"] == tiny_sdxl
    assert json.loads((base / "index.json").read_text())["model"]["kind"] == "sdxl"
    assert Image.open(tuned / "p001_s3.png").size == (16, 16)
    assert (_pixels(tuned, "p000_s0.png") != _pixels(base, "p000_s0.png")).any()  # the adapter is applied
    # The same images as the trained adapter loaded straight into the SDXL policy, on the same seeds.
    policy = StableDiffusionXLPolicy.from_pretrained(sdxl_run / "final")
    (batch,) = sample_on_seeds(policy, ["a dog"], [3], num_inference_steps=2, guidance_scale=4.0, eta=1.0,
                               batch_size=1)
    direct = (batch.images[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(direct.astype(np.int16), _pixels(tuned, "p001_s3.png"))


def test_checkpoints_and_final_of_an_sdxl_run_load_as_sdxl(sdxl_run):
    last = load_model(str(sdxl_run / "checkpoints" / "checkpoint_1"))
    final = load_model(str(sdxl_run / "final"))
    assert isinstance(last.policy, StableDiffusionXLPolicy) and isinstance(final.policy, StableDiffusionXLPolicy)
    assert last.info["kind"] == final.info["kind"] == "sdxl"
    assert last.info["checkpoint_epoch"] == 1 and last.info["lora"] is True
    a, b = last.policy.trainable_state_dict(), final.policy.trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the last checkpoint is the final model


def test_evaluate_sdxl_lora_checkpoint_and_full_results(sdxl_run, sdxl_full, tiny_sdxl, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--base", tiny_sdxl, "--model", str(sdxl_run / "final"), "--model",
                 str(sdxl_run / "checkpoints" / "checkpoint_0"), "--model", sdxl_full, "--name", "lora", "ckpt0",
                 "full", "--reward", "jpeg_compressibility", "--prompts", *PROMPTS, "--num-seeds", "2",
                 "--steps", "2", "--guidance", "4.0", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    models = {m["name"]: m for m in results["models"]}
    assert list(models) == ["base", "lora", "ckpt0", "full"]
    assert {name: (m["kind"], m["lora"]) for name, m in models.items()} == {
        "base": ("sdxl", False), "lora": ("sdxl", True), "ckpt0": ("sdxl", True), "full": ("sdxl", False)}
    assert models["ckpt0"]["checkpoint_epoch"] == 0
    per_image = {m: [s["rewards"]["jpeg_compressibility"] for s in results["samples"][m]] for m in models}
    assert all(len(v) == 4 for v in per_image.values())
    assert per_image["full"] != per_image["base"] and per_image["lora"] != per_image["base"]
    assert results["versus_baseline"]["full"]["train"]["reward/jpeg_compressibility"]["mean"] != 0
    assert (out / results["samples"]["full"][0]["file"]).is_file()
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert "full - base" in capsys.readouterr().out


def test_report_for_an_sdxl_run(sdxl_run, tmp_path):
    out = tmp_path / "r.html"
    assert main(["report", str(sdxl_run), "--num", "2", "--seeds", "0", "1", "--steps", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert "Samples from the same noise" in text and "Training curves" in text and "config.yaml" in text
    assert text.count("data:image/png;base64,") >= 4  # base and tuned samples, at least two seeds each
