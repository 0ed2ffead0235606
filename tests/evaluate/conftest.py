"""A finished training run folder, made by hand: config.yaml, metrics.jsonl and a LoRA result in final/."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="session")
def lora_run(tiny_ddpm_path, tmp_path_factory):
    """A run on the tiny DDPM whose final/ is a LoRA adapter with non-zero weights (so it samples differently)."""
    from diffrl.config import DDPOConfig
    from diffrl.pipelines.ddpm import DDPMPolicy

    run = tmp_path_factory.mktemp("logs") / "run1"
    run.mkdir()
    DDPOConfig.from_dict({"model": tiny_ddpm_path, "reward": "jpeg_compressibility", "sample_num_steps": 2,
                          "mixed_precision": "no", "num_epochs": 4}).to_yaml(run / "config.yaml")
    with (run / "metrics.jsonl").open("w") as f:
        for epoch in range(4):
            f.write(json.dumps({"step": epoch + 1, "epoch": float(epoch), "reward/mean": -0.8 + 0.05 * epoch,
                                "reward/std": 0.01, "loss/policy": 0.1 / (epoch + 1)}) + "\n")
    policy = DDPMPolicy.from_pretrained(tiny_ddpm_path, use_lora=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in policy.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    policy.save_pretrained(run / "final")
    return run
