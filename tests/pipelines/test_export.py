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


def test_single_file_export_loads_with_from_single_file_and_samples_the_same_images(lora_result, tiny_sd_path,
                                                                                     tmp_path, capsys):
    """The LoRA (alpha 16) merged into one original-layout checkpoint: diffusers' own single-file loader rebuilds
    the pipeline and samples what diffrl samples from the same noise."""
    from diffusers import DDIMScheduler

    policy, folder = lora_result
    out = tmp_path / "model.safetensors"
    assert main(["export", str(folder), "--format", "single_file", "--out", str(out)]) == 0
    with safe_open(out, "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    pipe = StableDiffusionPipeline.from_single_file(str(out), config=tiny_sd_path, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    prompts = ["a cat", "a dog"]
    ours = policy.sample(prompts, num_inference_steps=4, guidance_scale=5.0, eta=1.0,
                         generator=torch.Generator().manual_seed(3)).trajectory.images
    theirs = pipe(prompts, num_inference_steps=4, guidance_scale=5.0, eta=1.0, output_type="pt",
                  generator=torch.Generator().manual_seed(3)).images
    # Exactly what diffrl samples with the merged weights; the merged UNet computes what the adapter does up to
    # float32 rounding of W + s B A (compared on one forward pass: four stochastic steps and the VAE amplify the
    # rounding to 1.7e-4 .. 1.7e-3 in the images, depending on the random perturbation).
    merged = StableDiffusionPolicy.from_pretrained(tiny_sd_path, use_lora=False)
    merged.trainable_module.load_state_dict(pipe.unet.state_dict())
    same_weights = merged.sample(prompts, num_inference_steps=4, guidance_scale=5.0, eta=1.0,
                                 generator=torch.Generator().manual_seed(3)).trajectory.images
    torch.testing.assert_close(theirs, same_weights, rtol=0, atol=1e-6)
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None)
    dim = base.text_encoder.config.hidden_size
    torch.testing.assert_close(_unet_out(pipe.unet, dim), _unet_out(policy.trainable_module, dim), rtol=0, atol=1e-5)
    assert (theirs - ours).abs().max() < 1e-2
    assert (_unet_out(pipe.unet, dim) - _unet_out(base.unet, dim)).abs().max() > 1e-3  # the LoRA is merged in
    assert main(["export", str(folder), "--format", "single_file", "--out", str(tmp_path / "folder")]) == 2
    assert "writes one file" in capsys.readouterr().err


def test_the_original_layout_names_round_trip_through_diffusers_converter_at_two_layers_per_block():
    """Real SD has two resnets per down block and a last block without a downsampler (the tiny model has one):
    the index arithmetic is checked against diffusers' own LDM -> diffusers converter."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from diffrl.pipelines.single_file import unet_to_ldm, vae_to_ldm

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(8, 16, 16), cross_attention_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
        attention_head_dim=2)
    ldm = unet_to_ldm(unet.state_dict(), layers_per_block=2, up_block_types=list(unet.config.up_block_types))
    assert "input_blocks.4.1.proj_in.weight" in ldm and "output_blocks.5.2.conv.weight" in ldm
    back = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in ldm.items()}, dict(unet.config))
    assert set(back) == set(unet.state_dict())
    assert all(torch.equal(back[k], v) for k, v in unet.state_dict().items())
    vae = AutoencoderKL(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    ldm_vae = vae_to_ldm(vae.state_dict(), num_blocks=3)
    back = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in ldm_vae.items()}, dict(vae.config))
    assert set(back) == set(vae.state_dict())
    assert all(torch.equal(back[k].reshape(v.shape), v) for k, v in vae.state_dict().items())


def test_sdxl_single_file_export_loads_back_weight_for_weight(tmp_path):
    """SDXL's single file: the UNet with the LoRA merged in, the VAE, CLIP-L and OpenCLIP-bigG (in open_clip's own
    layout: stacked q/k/v, transposed projection) come back through diffusers' loader exactly."""
    from diffusers import StableDiffusionXLPipeline

    from diffrl.pipelines import StableDiffusionXLPolicy
    from diffrl.pipelines.lora import merged_unet
    from diffrl.testing.sdxl import save_tiny_sdxl

    model = str(save_tiny_sdxl(tmp_path / "sdxl", text_width_2=24))  # bigG is wider than CLIP-L, as in SDXL
    policy = StableDiffusionXLPolicy.from_pretrained(model, lora=LoraSettings(rank=4, alpha=16))
    perturb_trainable(policy, scale=0.2)
    policy.save_pretrained(tmp_path / "final")
    out = tmp_path / "sdxl.safetensors"
    assert main(["export", str(tmp_path / "final"), "--format", "single_file", "--out", str(out)]) == 0
    with safe_open(out, "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in set(f.keys())
    back = StableDiffusionXLPipeline.from_single_file(str(out), config=model)
    expected = {"unet": merged_unet(policy.trainable_module).state_dict(), "vae": policy.pipeline.vae.state_dict(),
                "text_encoder": policy.pipeline.text_encoder.state_dict(),
                "text_encoder_2": policy.pipeline.text_encoder_2.state_dict()}
    for name, state in expected.items():
        loaded = getattr(back, name).state_dict()
        assert set(loaded) == set(state), name
        assert all(torch.equal(loaded[k].reshape(v.shape), v) for k, v in state.items()), name
