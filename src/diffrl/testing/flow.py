"""Tiny random-weight flow-matching pipelines (Stable Diffusion 3, FLUX.1), built offline and saved in diffusers'
layout.

SD3 at a few tens of thousands of parameters: an ``SD3Transformer2DModel`` (MMDiT, patch 2), two
``CLIPTextModelWithProjection`` encoders (their pooled embeddings concatenated), an optional T5 encoder with a T5
tokenizer built in memory (a character-level Unigram model in the ``tokenizers`` library), the 16-channel
``AutoencoderKL`` with SD3's ``shift_factor``/``scaling_factor``, and ``FlowMatchEulerDiscreteScheduler`` with
SD3's shift 3. FLUX.1: a ``FluxTransformer2DModel`` (one double- and one single-stream block, rotary axes, the
guidance embedding of FLUX.1-dev or none as FLUX.1-schnell), one CLIP (pooled) and T5, a VAE with FLUX's shift and
scale, and the dynamically shifted scheduler config FLUX ships. Shapes follow diffusers' fast tests, shrunk to 16x16
images.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

from diffrl.testing.models import build_tiny_vae, tiny_clip_text_config
from diffrl.testing.tokenizer import make_clip_tokenizer

CLIP_WIDTH = 16  # hidden and projection width of each CLIP; SD3 concatenates both (32 states, 32 pooled)
T5_WIDTH = 32  # = the transformer's joint_attention_dim (CLIP states are padded to it)

# SD3's VAE: 16 latent channels, shifted and scaled (stabilityai/stable-diffusion-3-medium's config values).
SD3_VAE = dict(latent_channels=16, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False,
               use_post_quant_conv=False)


# FLUX.1's VAE scaling (black-forest-labs/FLUX.1-dev's config values) on the tiny 4-channel VAE (packed: 16).
FLUX_VAE = dict(shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False)
# FLUX.1-dev's scheduler config: resolution-dependent shift between base_shift and max_shift.
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)


def make_t5_tokenizer() -> T5TokenizerFast:
    """A character-level T5 tokenizer (pad 0, eos 1, unk 2, printable ASCII), built in memory."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(chr(c), -1.0) for c in range(33, 127)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0)


def build_tiny_t5(tokenizer: T5TokenizerFast) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=8, d_ff=32, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def build_tiny_sd3(seed: int = 0, *, max_length: int = 16, with_t5: bool = True) -> StableDiffusion3Pipeline:
    """An SD3-shaped pipeline: 16x16 images, 8x8x16 latents (4x4 patches of 2), a 2-layer MMDiT.
    ``with_t5=False``: no third text encoder (``text_encoder_3=None``, as diffusers allows)."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=2 * CLIP_WIDTH, pos_embed_max_size=16)
    vae = build_tiny_vae(**SD3_VAE)
    with tempfile.TemporaryDirectory() as tmp:
        clip_tokenizer = make_clip_tokenizer(tmp, model_max_length=max_length)
    clip_l = CLIPTextModelWithProjection(tiny_clip_text_config(clip_tokenizer, max_length, projection_dim=CLIP_WIDTH))
    clip_g = CLIPTextModelWithProjection(tiny_clip_text_config(clip_tokenizer, max_length, projection_dim=CLIP_WIDTH))
    t5_tokenizer = make_t5_tokenizer() if with_t5 else None
    t5 = build_tiny_t5(t5_tokenizer) if with_t5 else None
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip_l, tokenizer=clip_tokenizer, text_encoder_2=clip_g, tokenizer_2=clip_tokenizer,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer)


def save_tiny_sd3(directory: str | Path, seed: int = 0, *, with_t5: bool = True) -> Path:
    """Build and ``save_pretrained`` a tiny SD3 pipeline; returns the folder."""
    directory = Path(directory)
    build_tiny_sd3(seed, with_t5=with_t5).save_pretrained(directory)
    return directory


def build_tiny_flux(seed: int = 0, *, max_length: int = 16, guidance_embeds: bool = True) -> FluxPipeline:
    """A FLUX.1-shaped pipeline: 16x16 images, 8x8x4 latents packed into 16 tokens of 16 channels.
    ``guidance_embeds=False``: no guidance embedding, as FLUX.1-schnell."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4))
    vae = build_tiny_vae(**FLUX_VAE)
    with tempfile.TemporaryDirectory() as tmp:
        clip_tokenizer = make_clip_tokenizer(tmp, model_max_length=max_length)
    clip = CLIPTextModel(tiny_clip_text_config(clip_tokenizer, max_length))
    t5_tokenizer = make_t5_tokenizer()
    return FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae,
        text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=build_tiny_t5(t5_tokenizer),
        tokenizer_2=t5_tokenizer)


def save_tiny_flux(directory: str | Path, seed: int = 0, *, guidance_embeds: bool = True) -> Path:
    """Build and ``save_pretrained`` a tiny FLUX.1 pipeline; returns the folder."""
    directory = Path(directory)
    build_tiny_flux(seed, guidance_embeds=guidance_embeds).save_pretrained(directory)
    return directory
