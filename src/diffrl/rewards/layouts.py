"""Published reward checkpoints in their original layouts, renamed to the transformers models that run them.

HPSv2 ships an open_clip ``ViT-H-14`` state dict and ImageReward a BLIP (salesforce/BLIP, ``med.py``)
state dict. Their own loaders need open_clip or the ``image-reward`` package, both of which import
torchvision (which must match the installed torch build exactly) and, for ImageReward, transformers
internals that later releases removed. The architectures are the ones transformers already has
(``CLIPModel``; ``BlipVisionModel`` + ``BlipTextModel``), so each checkpoint is renamed key by key
here, in pure functions, and loaded into those. No tensor values change except that open_clip's fused
attention input projection is split into q/k/v and its ``[in, out]`` projections are transposed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

__all__ = ["clip_from_open_clip", "open_clip_layers", "blip_from_original", "blip_widths", "BLIP_PREFIXES"]

Tensors = Mapping[str, torch.Tensor]

_OPEN_CLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPEN_CLIP_TOWER = {
    # open_clip name -> transformers CLIPModel name
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_OPEN_CLIP_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def open_clip_layers(state: Tensors) -> tuple[int, int]:
    """How many residual blocks the (vision, text) towers of an open_clip state dict have."""
    vision, text = set(), set()
    for key in state:
        match = _RESBLOCK.match(key)
        if match:
            (vision if match.group(1) else text).add(int(match.group(2)))
    return len(vision), len(text)


def clip_from_open_clip(state: Tensors) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (``visual.*``, ``transformer.*``, ...) under transformers ``CLIPModel`` names.

    Keys it does not know (e.g. open_clip's ``attn_mask`` buffer) raise ``KeyError`` naming them, so a
    checkpoint of another architecture (layer scale, attention pooling) is refused instead of half-loaded.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in _OPEN_CLIP_TOWER:
            out[_OPEN_CLIP_TOWER[key]] = value
        elif key in _OPEN_CLIP_PROJECTIONS:
            out[_OPEN_CLIP_PROJECTIONS[key]] = value.t().contiguous()  # open_clip multiplies x @ proj
        elif (match := _RESBLOCK.match(key)) is not None:
            tower = "vision_model" if match.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{match.group(2)}", match.group(3)
            if rest.startswith("attn.in_proj_"):
                kind = rest.removeprefix("attn.in_proj_")  # weight [3D, D] or bias [3D], packed q, k, v
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}.self_attn.{name}.{kind}"] = part.contiguous()
                continue
            module, _, kind = rest.rpartition(".")
            if module not in _OPEN_CLIP_BLOCK:
                unknown.append(key)
                continue
            out[f"{prefix}.{_OPEN_CLIP_BLOCK[module]}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"not an open_clip ViT CLIP state dict: unexpected keys {sorted(unknown)[:5]}")
    return out


BLIP_PREFIXES = ("blip.visual_encoder.", "blip.text_encoder.", "mlp.")
"""What an ImageReward checkpoint holds that scoring uses: BLIP's ViT, its BERT text encoder and the MLP head."""

_BLIP_VISION = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_BLIP_BLOCK = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_BLIP_VISION_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")


def blip_from_original(state: Tensors) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an ImageReward state dict into (``BlipVisionModel``, ``BlipTextModel``, MLP head) state dicts.

    BLIP's text encoder (``med.py``) was ported to transformers with its names kept, so it only loses its
    prefix; the ViT (timm's layout) is renamed. Anything else in the file (BLIP's contrastive projections,
    ``position_ids`` buffers) is not used for scoring and is dropped.
    """
    vision: dict[str, torch.Tensor] = {}
    text: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            rest = key.removeprefix("blip.visual_encoder.")
            if rest in _BLIP_VISION:
                vision[_BLIP_VISION[rest]] = value
            elif (match := _BLIP_VISION_BLOCK.match(rest)) is not None and match.group(2) in _BLIP_BLOCK:
                vision[f"encoder.layers.{match.group(1)}.{_BLIP_BLOCK[match.group(2)]}.{match.group(3)}"] = value
            else:
                raise KeyError(f"not a BLIP ViT: unexpected key {key!r}")
        elif key.startswith("blip.text_encoder."):
            if not key.endswith("position_ids"):
                text[key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = value
    return vision, text, head


def blip_widths(vision: Tensors, text: Tensors) -> dict[str, int]:
    """The sizes a BLIP ViT and BERT text encoder were built with, read off their tensors.

    Attention heads are not stored; BLIP's ViT-B/L and BERT-base use 64-wide heads, so ``heads = width // 64``.
    """
    count = lambda state, pattern: len({m.group(1) for k in state if (m := re.match(pattern, k))})  # noqa: E731
    vision_width = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    positions = vision["embeddings.position_embedding"].shape[1]
    text_width = text["embeddings.word_embeddings.weight"].shape[1]
    return {
        "vision_width": vision_width,
        "vision_layers": count(vision, r"encoder\.layers\.(\d+)\."),
        "vision_intermediate": vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        "patch_size": patch,
        "image_size": round((positions - 1) ** 0.5) * patch,
        "text_width": text_width,
        "text_layers": count(text, r"encoder\.layer\.(\d+)\."),
        "text_intermediate": text["encoder.layer.0.intermediate.dense.weight"].shape[0],
        "vocab_size": text["embeddings.word_embeddings.weight"].shape[0],
        "max_positions": text["embeddings.position_embeddings.weight"].shape[0],
        "encoder_width": text["encoder.layer.0.crossattention.self.key.weight"].shape[1],
    }
