"""A Stable Diffusion 1.x or SDXL pipeline as one original-layout checkpoint file, the single ``.safetensors`` that
AUTOMATIC1111, ComfyUI's checkpoint loader and diffusers' ``from_single_file`` read.

diffusers converts that layout into its own when loading (``diffusers.loaders.single_file_utils``) but ships no
converter back, so the inverse renaming is written here, as pure functions of state dicts and the models' configs
(the layout is CompVis' ``ldm`` code: ``model.diffusion_model.*`` for the UNet, ``first_stage_model.*`` for the VAE,
``cond_stage_model.transformer.*`` for SD 1.x's CLIP text encoder; Stability's ``sgm`` code for SDXL:
``conditioner.embedders.0.transformer.*`` for CLIP-L and ``conditioner.embedders.1.model.*`` for OpenCLIP-bigG in
open_clip's own layout). Tensors are unchanged except the VAE's attention projections, which LDM stores as 1x1
convolutions, and OpenCLIP's attention input projection (q, k, v stacked) and text projection (transposed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

__all__ = ["open_clip_text_to_ldm", "unet_to_ldm", "vae_to_ldm", "sd1_checkpoint", "sdxl_checkpoint"]

Tensors = Mapping[str, torch.Tensor]

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _resnet(rest: str) -> str:
    module, _, tail = rest.partition(".")
    return f"{_RESNET.get(module, module)}.{tail}" if tail else _RESNET.get(module, module)


def unet_to_ldm(state: Tensors, *, layers_per_block: int, up_block_types: Sequence[str]) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DConditionModel`` state dict under the LDM UNet's names (without the
    ``model.diffusion_model.`` prefix). Down block ``i``'s resnet/attention ``j`` is input block
    ``(L + 1) i + j + 1``, its downsampler input block ``(L + 1)(i + 1)``; up block ``i``'s ``j`` is output block
    ``(L + 1) i + j``, its upsampler the last layer of output block ``(L + 1) i + L`` (``L = layers_per_block``)."""
    stride = layers_per_block + 1
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = None
        for ours, theirs in _UNET_TOP.items():
            if key.startswith(ours + "."):
                name = theirs + key[len(ours):]
        if name is None and (m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)):
            block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = stride * block + j + 1
            name = f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
        elif name is None and (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key)):
            name = f"input_blocks.{stride * (int(m[1]) + 1)}.0.op.{m[2]}"
        elif name is None and (m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)):
            kind, j, rest = m[1], int(m[2]), m[3]
            name = f"middle_block.{2 * j}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        elif name is None and (m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)):
            block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = stride * block + j
            name = f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
        elif name is None and (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key)):
            block = int(m[1])
            layer = 2 if "CrossAttn" in up_block_types[block] else 1  # after the resnet (and the attention)
            name = f"output_blocks.{stride * block + layers_per_block}.{layer}.conv.{m[2]}"
        if name is None:
            raise KeyError(f"no LDM name for the UNet weight {key!r}")
        out[name] = value
    return out


_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_part(rest: str) -> str:
    module, _, tail = rest.partition(".")
    return f"{_VAE_RESNET.get(module, module)}.{tail}"


def vae_to_ldm(state: Tensors, *, num_blocks: int) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict under the LDM autoencoder's names (without
    ``first_stage_model.``). The decoder's up blocks are numbered from the bottom in LDM (``up.{n-1-i}``), and
    attention projections are 1x1 convolutions there."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = None
        if m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            name = f"{m[1]}.norm_out.{m[2]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            name = f"encoder.down.{m[1]}.block.{m[2]}.{_vae_part(m[3])}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            name = f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            name = f"decoder.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.{_vae_part(m[3])}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            name = f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            name = f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_part(m[3])}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            if m[2] not in _VAE_ATTENTION:
                raise KeyError(f"no LDM name for the VAE weight {key!r}")
            name = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm" and value.dim() == 2:
                value = value[:, :, None, None]  # LDM's 1x1 convolution
        elif re.match(r"(encoder|decoder)\.(conv_in|conv_out)\.|(post_)?quant_conv\.", key):
            name = key
        if name is None:
            raise KeyError(f"no LDM name for the VAE weight {key!r}")
        out[name] = value
    return out


def _text_model_keys(state: Tensors) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder's state dict with the ``text_model.`` prefix the original files use
    (transformers 5 saves ``CLIPTextModel`` without it)."""
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in state.items()}


def open_clip_text_to_ldm(state: Tensors) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModelWithProjection`` state dict in open_clip's text-tower layout (``transformer.
    resblocks.{i}.attn.in_proj_weight`` with q, k, v stacked, ``text_projection`` as ``[width, embed]``)."""
    state = _text_model_keys(state)
    out: dict[str, torch.Tensor] = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
    }
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].t().contiguous()
    layers = {int(m[1]) for k in state if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))}
    for i in sorted(layers):
        ours, theirs = f"text_model.encoder.layers.{i}", f"transformer.resblocks.{i}"
        for kind in ("weight", "bias"):
            out[f"{theirs}.attn.in_proj_{kind}"] = torch.cat(
                [state[f"{ours}.self_attn.{n}_proj.{kind}"] for n in ("q", "k", "v")])
            for src, dst in (("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
                             ("mlp.fc2", "mlp.c_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
                out[f"{theirs}.{dst}.{kind}"] = state[f"{ours}.{src}.{kind}"]
    return out


def _unet_and_vae(unet: torch.nn.Module, vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    ldm_unet = unet_to_ldm(unet.state_dict(), layers_per_block=int(unet.config.layers_per_block),
                           up_block_types=list(unet.config.up_block_types))
    ldm_vae = vae_to_ldm(vae.state_dict(), num_blocks=len(vae.config.block_out_channels))
    out = {f"model.diffusion_model.{k}": v for k, v in ldm_unet.items()}
    out.update({f"first_stage_model.{k}": v for k, v in ldm_vae.items()})
    return out


def sdxl_checkpoint(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                    text_encoder_2: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole SDXL base checkpoint (UNet, VAE, CLIP-L, OpenCLIP-bigG) under the original single-file names."""
    out = _unet_and_vae(unet, vae)
    out.update({f"conditioner.embedders.0.transformer.{k}": v
                for k, v in _text_model_keys(text_encoder.state_dict()).items()})
    out.update({f"conditioner.embedders.1.model.{k}": v
                for k, v in open_clip_text_to_ldm(text_encoder_2.state_dict()).items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def sd1_checkpoint(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole SD 1.x checkpoint (UNet, VAE, CLIP text encoder) under the original single-file names."""
    out = _unet_and_vae(unet, vae)
    out.update({f"cond_stage_model.transformer.{k}": v for k, v in _text_model_keys(text_encoder.state_dict()).items()})
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}
