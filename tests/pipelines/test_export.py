"""`diffrl export`: a result or a checkpoint written for diffusers (LoRA with alpha), for AUTOMATIC1111 / ComfyUI
(kohya keys), or merged into a plain pipeline; each read back by the tool it is for (diffusers here)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from diffrl.cli import main
from diffrl.pipelines import LoraSettings, StableDiffusionPolicy

from .helpers import perturb_trainable


@pytest.fixture(scope="module")
def lora_result(tiny_sd_path, tmp_path_factory):
    """A LoRA result with alpha 16 at rank 4 (alpha = rank would hide a wrong scale)."""
    policy = StableDiffusionPolicy.from_pretrained(tiny_sd_path, lora=LoraSettings(rank=4, alpha=16))
    perturb_trainable(policy, scale=0.2)
    folder = tmp_path_factory.mktemp("result") / "final"
    policy.save_pretrained(folder)
    return policy, folder


def _unet_out(unet, text_dim: int) -> torch.Tensor:
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    states = torch.randn(1, 16, text_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return unet(x, 10, encoder_hidden_states=states).sample


def test_kohya_export_loads_into_diffusers_at_the_trained_scale(lora_result, tiny_sd_path, tmp_path, capsys):
    policy, folder = lora_result
    out = tmp_path / "lora.safetensors"
    assert main(["export", str(folder), "--format", "kohya", "--out", str(out)]) == 0
    assert "LoRA rank 4, alpha 16" in capsys.readouterr().out
    with safe_open(out, "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert all(k.startswith("lora_unet_") for k in keys) and any(k.endswith(".lora_down.weight") for k in keys)
    assert alphas == {16.0} and metadata["ss_network_alpha"] == "16" and metadata["ss_network_dim"] == "4"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    dim = pipe.text_encoder.config.hidden_size
    base = _unet_out(pipe.unet, dim)
    pipe.load_lora_weights(str(out))  # diffusers reads kohya files (as A1111 and ComfyUI do)
    ours = _unet_out(policy.trainable_module, dim)
    torch.testing.assert_close(_unet_out(pipe.unet, dim), ours, rtol=0, atol=1e-5)
    assert (ours - base).abs().max() > 1e-3


def test_merged_export_is_a_plain_pipeline_with_the_adapter_in_its_weights(lora_result, tmp_path):
    policy, folder = lora_result
    assert main(["export", str(folder), "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())
    dim = pipe.text_encoder.config.hidden_size
    torch.testing.assert_close(_unet_out(pipe.unet, dim), _unet_out(policy.trainable_module, dim), rtol=0,
                               atol=1e-5)


def test_a_training_checkpoint_exports_as_a_lora(tiny_sd_path, tmp_path):
    from diffrl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline
    from diffrl.config import ConfigError

    config = DDPOConfig(num_epochs=1, sample_num_steps=2, sample_batch_size=2, sample_num_batches_per_epoch=1,
                        train_batch_size=2, mixed_precision="no", logdir=str(tmp_path / "logs"), run_name="r")

    def reward(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3)), {}

    with pytest.raises(ConfigError, match=r"lora_alpha=8: differs from the policy the trainer was given "
                                          r"\(lora_alpha=4\)"):  # the config cannot silently lose to the pipeline
        DDPOTrainer(DDPOConfig(lora_alpha=8, mixed_precision="no"), reward, lambda: ("a cat", {}),
                    DefaultDDPOStableDiffusionPipeline(tiny_sd_path))
    # TRL style: the pipeline is built by the caller and the config names neither the model nor the LoRA; the run
    # records what ran, so its checkpoints rebuild it
    pipeline = DefaultDDPOStableDiffusionPipeline(tiny_sd_path, lora=LoraSettings(rank=4, alpha=8))
    trainer = DDPOTrainer(config, reward, lambda: ("a cat", {}), pipeline)
    trainer.train()
    checkpoint = tmp_path / "logs" / "r" / "checkpoints" / "checkpoint_0"
    assert main(["export", str(checkpoint), "--format", "diffusers", "--out", str(tmp_path / "epoch0")]) == 0
    with safe_open(tmp_path / "epoch0" / "pytorch_lora_weights.safetensors", "pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.lora_alpha"] == 8
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    pipe.load_lora_weights(str(tmp_path / "epoch0"))
    dim = pipe.text_encoder.config.hidden_size
    torch.testing.assert_close(_unet_out(pipe.unet, dim), _unet_out(trainer.policy.trainable_module, dim), rtol=0,
                               atol=1e-5)


def test_formats_a_result_cannot_take_are_one_line_errors(lora_result, tiny_ddpm_path, tmp_path, capsys):
    _, folder = lora_result
    assert main(["export", str(folder), "--format", "kohya", "--out", str(tmp_path / "x")]) == 2
    assert main(["export", tiny_ddpm_path, "--format", "kohya", "--out", str(tmp_path / "x.safetensors")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("diffrl export: error:")]
    assert len(errors) == 2
    assert "ending in .safetensors" in errors[0] and "no kohya LoRA format" in errors[1]
