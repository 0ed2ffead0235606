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
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from diffrl.testing.models import TINY_LATENT_UNET, build_tiny_vae, tiny_clip_text_config
from diffrl.testing.tokenizer import make_clip_tokenizer

TEXT_WIDTH = 16  # hidden size of each text encoder (tiny_clip_text_config's); the UNet sees both (32)
PROJECTION_DIM = 16  # width of the pooled embedding of the second encoder
TIME_EMBED_DIM = 8  # per-number width of the six add_time_ids


def build_tiny_sdxl(seed: int = 0, *, max_length: int = 16, force_upcast: bool = True,
                    text_width_2: int = TEXT_WIDTH) -> StableDiffusionXLPipeline:
    """An SDXL-shaped pipeline: 16x16 images, 8x8x4 latents, two 2-layer CLIP text encoders. ``text_width_2``:
    the second encoder's width (real SDXL: 768 and 1280; tools that tell the two apart by width, such as
    diffusers' single-file loader, need them to differ)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **TINY_LATENT_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=TEXT_WIDTH + text_width_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + PROJECTION_DIM,
    )
    vae = build_tiny_vae(scaling_factor=0.13025, force_upcast=force_upcast)  # SDXL's VAE scaling factor
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_clip_tokenizer(Path(tmp) / "1", model_max_length=max_length)
        tokenizer_2 = make_clip_tokenizer(Path(tmp) / "2", model_max_length=max_length)
    text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer, max_length, projection_dim=PROJECTION_DIM))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_text_config(
        tokenizer_2, max_length, projection_dim=PROJECTION_DIM, hidden_size=text_width_2,
        intermediate_size=2 * text_width_2))
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
