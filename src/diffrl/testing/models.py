"""Tiny random-weight Stable Diffusion and DDPM pipelines, built offline and saved in diffusers' layout.

They have the real architectures (``UNet2DConditionModel`` + ``AutoencoderKL`` + CLIP text encoder, and
``UNet2DModel``) at a few thousand parameters, so the whole loading, sampling, training and saving path
runs in seconds on a CPU.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from diffrl.testing.tokenizer import make_clip_tokenizer


# The scheduler config Stable Diffusion 2.x (768-pixel ``stabilityai/stable-diffusion-2-1``) ships: DDIM,
# SD's scaled-linear betas, velocity prediction (Salimans & Ho 2022).
SD2_SCHEDULER_CONFIG = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False,
    prediction_type="v_prediction", set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None,
)


# The layout every tiny UNet shares: two resolutions of 8 and 16 channels, one layer each, 4 norm groups.
TINY_UNET_LAYOUT = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
# The latent-space UNets (SD, SDXL): 8x8x4 latents in and out.
TINY_LATENT_UNET = dict(sample_size=8, in_channels=4, out_channels=4, **TINY_UNET_LAYOUT)


def build_tiny_vae(**overrides) -> AutoencoderKL:
    """The tiny ``AutoencoderKL`` of the latent models: 16x16x3 images, 8x8x4 latents (``overrides``: other
    config values, e.g. SDXL's scaling factor)."""
    settings = dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    return AutoencoderKL(**(settings | overrides))


def tiny_clip_text_config(tokenizer, max_length: int, **overrides) -> CLIPTextConfig:
    """A 2-layer, 16-wide CLIP text encoder config for ``tokenizer`` (its vocabulary and special tokens);
    ``overrides`` replace any setting."""
    settings = dict(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextConfig(**(settings | overrides))


def build_tiny_stable_diffusion(seed: int = 0, *, max_length: int = 16, version: int = 1) -> StableDiffusionPipeline:
    """A Stable Diffusion-shaped pipeline: 16x16 images, 8x8x4 latents, a 2-layer CLIP text encoder.

    ``version=1``: SD 1.x (PNDM config, epsilon prediction). ``version=2``: SD 2.x (v-prediction DDIM config
    of :data:`SD2_SCHEDULER_CONFIG`, linear projections in the attention blocks and upcast attention, as
    SD 2.1's UNet config has).
    """
    if version not in (1, 2):
        raise ValueError(f"version={version!r}: the tiny Stable Diffusion comes in versions 1 and 2.")
    torch.manual_seed(seed)
    sd2 = dict(use_linear_projection=True, upcast_attention=True) if version == 2 else {}
    unet = UNet2DConditionModel(
        **sd2,
        **TINY_LATENT_UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
    )
    vae = build_tiny_vae()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_clip_tokenizer(tmp, model_max_length=max_length)
    text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer, max_length))
    if version == 2:
        scheduler = DDIMScheduler.from_config(SD2_SCHEDULER_CONFIG)  # keeps the extra PNDM key as SD 2.1 does
    else:  # Stable Diffusion 1.x ships a PNDM config; diffrl samples with DDIM built from it.
        scheduler = PNDMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
        )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_tiny_ddpm(seed: int = 0, *, channels: int = 3, sample_size: int = 8) -> DDPMPipeline:
    """An unconditional pixel-space DDPM (``UNet2DModel``) like ``google/ddpm-celebahq-256``, at 8x8."""
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        **TINY_UNET_LAYOUT,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
    )
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000))


def save_tiny_stable_diffusion(directory: str | Path, seed: int = 0, *, version: int = 1) -> Path:
    """Build and ``save_pretrained`` a tiny Stable Diffusion pipeline (``version`` 1 or 2); returns the folder."""
    directory = Path(directory)
    build_tiny_stable_diffusion(seed, version=version).save_pretrained(directory)
    return directory


def save_tiny_ddpm(directory: str | Path, seed: int = 0, *, channels: int = 3) -> Path:
    """Build and ``save_pretrained`` a tiny DDPM pipeline; returns the folder."""
    directory = Path(directory)
    build_tiny_ddpm(seed, channels=channels).save_pretrained(directory)
    return directory
