"""Tiny random-weight reward models, saved with ``save_pretrained`` (no download).

Each builder writes a directory that the reward classes in :mod:`diffrl.rewards`
load through the same ``from_pretrained`` calls they use for the Hub weights,
so tests and offline examples exercise the user's code path. The models are
random: they test plumbing (shapes, dtypes, devices, gradients, wiring), not
scores.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from diffrl.testing.tokenizer import make_clip_tokenizer

#: Layout of the LAION improved-aesthetic MLP: ``nn.Sequential`` indices of its Linear layers.
AESTHETIC_LINEAR_INDICES = (0, 2, 4, 6, 7)
_AESTHETIC_WIDTHS = (1024, 128, 64, 16, 1)

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% elif message['role'] == 'assistant' %} ASSISTANT: "
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
"""A LLaVA-1.5 style chat template ("USER: <image>\\n... ASSISTANT:")."""

# The width and depth of every tiny transformer here (CLIP's two towers, ViT, LLaVA's vision tower and Llama, BERT).
_TINY_TRANSFORMER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)


def _clip_image_processor(image_size: int):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )


def make_tiny_clip(
    directory: str | Path, *, image_size: int = 32, projection_dim: int = 16, seed: int = 0, hidden_act: str = "quick_gelu"
) -> Path:
    """A tiny random ``CLIPModel`` with tokenizer and image processor, as a Hub repo would hold them.

    Loads with ``CLIPModel.from_pretrained``, ``AutoTokenizer`` and ``AutoImageProcessor``.
    """
    from transformers import CLIPConfig, CLIPModel

    directory = Path(directory)
    tokenizer = make_clip_tokenizer(directory)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            **_TINY_TRANSFORMER,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "projection_dim": projection_dim,
            "hidden_act": hidden_act,
        },
        vision_config={
            **_TINY_TRANSFORMER,
            "image_size": image_size,
            "patch_size": 8,
            "projection_dim": projection_dim,
            "hidden_act": hidden_act,
        },
        projection_dim=projection_dim,
    )
    CLIPModel(config).eval().save_pretrained(directory)
    _clip_image_processor(image_size).save_pretrained(directory)
    return directory


def make_tiny_aesthetic_mlp(path: str | Path, *, input_size: int = 16, seed: int = 0, pickle: bool = False) -> Path:
    """Random weights in the LAION improved-aesthetic MLP layout (``layers.{0,2,4,6,7}.{weight,bias}``).

    Written as safetensors, or with ``torch.save`` (a ``.pth`` like LAION's file) when ``pickle``.
    """
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    fan_in = input_size
    for index, width in zip(AESTHETIC_LINEAR_INDICES, _AESTHETIC_WIDTHS):
        state[f"layers.{index}.weight"] = torch.randn(width, fan_in, generator=generator) / fan_in**0.5
        state[f"layers.{index}.bias"] = torch.randn(width, generator=generator) * 0.1
        fan_in = width
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if pickle:
        torch.save(state, path)
    else:
        save_file(state, str(path))
    return path


def make_tiny_vit_classifier(
    directory: str | Path, *, num_labels: int = 9, image_size: int = 32, seed: int = 0
) -> Path:
    """A tiny random ``ViTForImageClassification`` with a ``ViTImageProcessor`` (as ``nateraw/vit-age-classifier``)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    directory = Path(directory)
    torch.manual_seed(seed)
    config = ViTConfig(
        **_TINY_TRANSFORMER,
        image_size=image_size,
        patch_size=8,
        num_labels=num_labels,
        id2label={i: f"class_{i}" for i in range(num_labels)},
        label2id={f"class_{i}": i for i in range(num_labels)},
    )
    ViTForImageClassification(config).eval().save_pretrained(directory)
    ViTImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(directory)
    return directory


def _byte_level_tokenizer(special: list[str]):
    """A byte-level BPE tokenizer without merges: every text encodes, vocabulary of ~260."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(special + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )


def make_tiny_llava(directory: str | Path, *, image_size: int = 16, seed: int = 0) -> Path:
    """A tiny random LLaVA (CLIP vision tower + Llama text model) with its processor and chat template.

    Loads with ``AutoProcessor`` and ``AutoModelForImageTextToText``, like ``llava-hf/llava-1.5-7b-hf``.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    directory = Path(directory)
    tokenizer = _byte_level_tokenizer(["<pad>", "<s>", "</s>", "<unk>", "<image>"])
    tokenizer.padding_side = "left"
    patch_size = 8
    processor = LlavaProcessor(
        image_processor=_clip_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            **_TINY_TRANSFORMER,
            image_size=image_size,
            patch_size=patch_size,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            **_TINY_TRANSFORMER,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


_BERT_WORDS = (
    "the image contains a an of in on with and is are there this what going photo picture shows "
    "cat dog horse bird fish animal one two three four five washing dishes riding bike playing chess"
).split()


def make_tiny_bert(directory: str | Path, *, seed: int = 0) -> Path:
    """A tiny random ``BertModel`` with a WordPiece vocabulary generated here (words, letters, ``##`` pieces)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    punctuation = list(".,!?'\"-:;()")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *punctuation, *letters]
    tokens += [f"##{c}" for c in letters] + [w for w in _BERT_WORDS if w not in letters]
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    BertTokenizer(str(vocab_file)).save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokens),
        **(_TINY_TRANSFORMER | {"num_hidden_layers": 3}),
        max_position_embeddings=128,
    )
    BertModel(config).eval().save_pretrained(directory)
    return directory


def open_clip_state_dict(clip) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPModel``'s weights written in open_clip's layout (what HPSv2's checkpoint holds):
    fused ``attn.in_proj_*`` (q, k, v stacked), ``[in, out]`` projections, ``visual.``/``transformer.`` names."""
    state = {key: value.detach().clone() for key, value in clip.state_dict().items()}
    out = {
        "visual.conv1.weight": state["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": state["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": state["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": state["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": state["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": state["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": state["vision_model.post_layernorm.bias"],
        "visual.proj": state["visual_projection.weight"].t().contiguous(),
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].t().contiguous(),
        "logit_scale": state["logit_scale"],
    }
    towers = (("visual.", "vision_model", clip.config.vision_config), ("", "text_model", clip.config.text_config))
    for prefix, tower, config in towers:
        for i in range(config.num_hidden_layers):
            ours, theirs = f"{tower}.encoder.layers.{i}", f"{prefix}transformer.resblocks.{i}"
            for kind in ("weight", "bias"):
                out[f"{theirs}.attn.in_proj_{kind}"] = torch.cat(
                    [state[f"{ours}.self_attn.{n}_proj.{kind}"] for n in ("q", "k", "v")]
                )
                for src, dst in (("out_proj", "attn.out_proj"), ("fc1", "mlp.c_fc"), ("fc2", "mlp.c_proj")):
                    module = f"self_attn.{src}" if src == "out_proj" else f"mlp.{src}"
                    out[f"{theirs}.{dst}.{kind}"] = state[f"{ours}.{module}.{kind}"]
                out[f"{theirs}.ln_1.{kind}"] = state[f"{ours}.layer_norm1.{kind}"]
                out[f"{theirs}.ln_2.{kind}"] = state[f"{ours}.layer_norm2.{kind}"]
    return out


def make_tiny_hpsv2(directory: str | Path, *, seed: int = 1) -> Path:
    """A tiny HPSv2 stand-in: ``base/`` (a transformers CLIP repo with GELU, as ViT-H/14 has: config, tokenizer,
    image processor) and ``HPS_v2.1_compressed.pt`` (random weights of that CLIP in open_clip's layout under
    ``"state_dict"``, as ``xswu/HPSv2`` ships them). Returns ``directory``."""
    from transformers import CLIPModel

    directory = Path(directory)
    base = make_tiny_clip(directory / "base", hidden_act="gelu", seed=0)
    torch.manual_seed(seed)
    clip = CLIPModel.from_pretrained(base)
    with torch.no_grad():
        for parameter in clip.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)  # other weights than the base, as fine-tuning gives
    torch.save({"state_dict": open_clip_state_dict(clip)}, directory / "HPS_v2.1_compressed.pt")
    return directory


def blip_original_state_dict(vision, text, head) -> dict[str, torch.Tensor]:
    """transformers BLIP vision/text models and an MLP head written in ImageReward's layout
    (``blip.visual_encoder.*`` as timm's ViT, ``blip.text_encoder.*`` as BLIP's ``med.py``, ``mlp.layers.*``)."""
    renames = {
        "embeddings.class_embedding": "cls_token",
        "embeddings.position_embedding": "pos_embed",
        "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
        "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
        "post_layernorm.weight": "norm.weight",
        "post_layernorm.bias": "norm.bias",
    }
    blocks = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv",
              "self_attn.projection": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    out: dict[str, torch.Tensor] = {}
    for key, value in vision.state_dict().items():
        if key in renames:
            name = renames[key]
        else:
            _, _, index, *rest = key.split(".")
            module, kind = ".".join(rest[:-1]), rest[-1]
            name = f"blocks.{index}.{blocks[module]}.{kind}"
        out[f"blip.visual_encoder.{name}"] = value.detach().clone()
    for key, value in text.state_dict().items():
        out[f"blip.text_encoder.{key}"] = value.detach().clone()
    for key, value in head.state_dict().items():
        out[f"mlp.{key}"] = value.detach().clone()
    out["blip.vision_proj.weight"] = torch.zeros(4, vision.config.hidden_size)  # unused by scoring, present in the file
    return out


def tiny_blip_modules(vocab: int, *, seed: int = 0):
    """Random transformers BLIP ViT (128 wide, 2 heads), BLIP text encoder with cross-attention (64 wide) and an
    ImageReward-layout MLP head; the same ``seed`` gives the same weights."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    from diffrl.rewards.aesthetic import AestheticMLP

    torch.manual_seed(seed)
    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, hidden_act="gelu", layer_norm_eps=1e-6,
    )).eval()
    text = BlipTextModel(BlipTextConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=64, encoder_hidden_size=128, is_decoder=True, bos_token_id=vocab - 2, sep_token_id=3,
    ), add_pooling_layer=False).eval()
    return vision, text, AestheticMLP((64, 32, 16, 8, 4, 1)).eval()


def make_tiny_imagereward(directory: str | Path, *, seed: int = 0) -> Path:
    """A tiny ImageReward stand-in: ``tokenizer/`` (a BERT WordPiece tokenizer) and ``ImageReward.pt``
    (:func:`tiny_blip_modules` in the published layout). Returns ``directory``."""
    from transformers import BertTokenizer

    directory = Path(directory)
    make_tiny_bert(directory / "tokenizer")
    vocab = len(BertTokenizer.from_pretrained(directory / "tokenizer")) + 2  # BLIP adds [DEC] and [ENC]
    torch.save(blip_original_state_dict(*tiny_blip_modules(vocab, seed=seed)), directory / "ImageReward.pt")
    return directory
