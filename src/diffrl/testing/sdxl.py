"""A tiny random-weight Stable Diffusion XL pipeline, built offline and saved in diffusers' layout.

The real SDXL architecture at a few thousand parameters: a ``UNet2DConditionModel`` with ``text_time`` added
conditioning, two CLIP text encoders (the second a ``CLIPTextModelWithProjection`` giving the pooled
embedding) with their tokenizers, an ``AutoencoderKL`` with ``force_upcast``, and the Euler scheduler config
SDXL ships. Shapes follow diffusers' own SDXL fast tests (``addition_time_embed_dim * 6 + projection_dim``
feeds the added embedding), shrunk to 16x16 images.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffrl.testing.tokenizer import make_clip_tokenizer

TEXT_WIDTH = 16  # hidden size of each text encoder; the UNet sees both concatenated (32)
PROJECTION_DIM = 16  # width of the pooled embedding of the second encoder
TIME_EMBED_DIM = 8  # per-number width of the six add_time_ids


def _text_config(vocab_size: int, tokenizer, max_length: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=max_length, projection_dim=PROJECTION_DIM,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_sdxl(seed: int = 0, *, max_length: int = 16, force_upcast: bool = True) -> StableDiffusionXLPipeline:
    """An SDXL-shaped pipeline: 16x16 images, 8x8x4 latents, two 2-layer CLIP text encoders."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=2 * TEXT_WIDTH,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJECTION_DIM,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.13025,  # SDXL's VAE scaling factor
        force_upcast=force_upcast,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_clip_tokenizer(Path(tmp) / "1", model_max_length=max_length)
        tokenizer_2 = make_clip_tokenizer(Path(tmp) / "2", model_max_length=max_length)
    text_encoder = CLIPTextModel(_text_config(len(tokenizer), tokenizer, max_length))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(len(tokenizer_2), tokenizer_2, max_length))
    # SDXL base 1.0 ships this Euler config; diffrl samples with DDIM built from it.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def save_tiny_sdxl(directory: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build and ``save_pretrained`` a tiny SDXL pipeline; returns the folder."""
    directory = Path(directory)
    build_tiny_sdxl(seed, **kwargs).save_pretrained(directory)
    return directory


def save_tiny_sdxl_vae(directory: str | Path, seed: int = 1) -> Path:
    """A separately saved VAE of the same shape with ``force_upcast=False`` (a stand-in for an fp16-safe VAE such
    as ``madebyollin/sdxl-vae-fp16-fix``); returns the folder."""
    directory = Path(directory)
    build_tiny_sdxl(seed, force_upcast=False).vae.save_pretrained(directory)
    return directory
