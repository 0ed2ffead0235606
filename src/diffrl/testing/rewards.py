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


def make_tiny_clip(directory: str | Path, *, image_size: int = 32, projection_dim: int = 16, seed: int = 0) -> Path:
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
        },
        vision_config={
            **_TINY_TRANSFORMER,
            "image_size": image_size,
            "patch_size": 8,
            "projection_dim": projection_dim,
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
