"""HPSv2 and ImageReward on tiny random stand-ins in the published checkpoint layouts.

HPSv2 is checked against an independent forward of open_clip's architecture written here on the raw
checkpoint tensors (packed attention through torch's own ``multi_head_attention_forward``); ImageReward
against transformers' BLIP modules holding the weights before they were written in the published layout,
with the authors' tokenisation (35 tokens), [CLS] read-out, MLP and normalisation.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffrl.rewards import RewardError, available, load
from diffrl.rewards.imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD
from diffrl.rewards.preprocess import CLIP_MEAN, CLIP_STD
from diffrl.testing.rewards import make_tiny_hpsv2, make_tiny_imagereward, tiny_blip_modules

PROMPTS = ["a cat", "a dog riding a bike"]
MEAN = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(CLIP_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    return make_tiny_hpsv2(tmp_path_factory.mktemp("hps"))


def _open_clip_tower(x, state, prefix, layers, heads, mask=None):
    """open_clip's transformer: pre-norm residual blocks, packed q/k/v, GELU MLP (sequence-first for torch MHA)."""
    width = x.shape[-1]
    x = x.transpose(0, 1)
    for i in range(layers):
        block = f"{prefix}transformer.resblocks.{i}."
        h = F.layer_norm(x, (width,), state[block + "ln_1.weight"], state[block + "ln_1.bias"])
        h, _ = F.multi_head_attention_forward(
            h, h, h, width, heads, state[block + "attn.in_proj_weight"], state[block + "attn.in_proj_bias"],
            None, None, False, 0.0, state[block + "attn.out_proj.weight"], state[block + "attn.out_proj.bias"],
            training=False, need_weights=False, attn_mask=mask,
        )
        x = x + h
        h = F.layer_norm(x, (width,), state[block + "ln_2.weight"], state[block + "ln_2.bias"])
        h = F.linear(F.gelu(F.linear(h, state[block + "mlp.c_fc.weight"], state[block + "mlp.c_fc.bias"])),
                     state[block + "mlp.c_proj.weight"], state[block + "mlp.c_proj.bias"])
        x = x + h
    return x.transpose(0, 1)


def _hps_reference(directory, images, prompts):
    """HPS score = cos(image, text) of open_clip's towers, computed from the checkpoint's own tensors."""
    from transformers import AutoTokenizer, CLIPConfig

    state = torch.load(directory / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    config = CLIPConfig.from_pretrained(directory / "base")
    vision, text = config.vision_config, config.text_config
    pixels = (images - MEAN) / STD
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=vision.patch_size).flatten(2).transpose(1, 2)
    cls = state["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + state["visual.positional_embedding"]
    x = F.layer_norm(x, (x.shape[-1],), state["visual.ln_pre.weight"], state["visual.ln_pre.bias"])
    x = _open_clip_tower(x, state, "visual.", vision.num_hidden_layers, vision.num_attention_heads)
    x = F.layer_norm(x[:, 0], (x.shape[-1],), state["visual.ln_post.weight"], state["visual.ln_post.bias"])
    image = x @ state["visual.proj"]
    tokenizer = AutoTokenizer.from_pretrained(directory / "base")
    ids = tokenizer(prompts, padding=True, return_tensors="pt")["input_ids"]
    t = state["token_embedding.weight"][ids] + state["positional_embedding"][: ids.shape[1]]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    t = _open_clip_tower(t, state, "", text.num_hidden_layers, text.num_attention_heads, mask=causal)
    t = F.layer_norm(t, (t.shape[-1],), state["ln_final.weight"], state["ln_final.bias"])
    end = (ids == tokenizer.eos_token_id).int().argmax(-1)  # the end-of-text token's position
    prompt = t[torch.arange(len(prompts)), end] @ state["text_projection"]
    return F.cosine_similarity(image, prompt, dim=-1)


def test_hpsv2_is_the_cosine_of_open_clips_towers_on_the_published_layout(tiny_hps):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    values, metadata = load("hpsv2", model=str(tiny_hps), processor=str(tiny_hps / "base"))(images, PROMPTS)
    expected = _hps_reference(tiny_hps, images, PROMPTS)
    assert values.dtype == torch.float32 and values.shape == (2,)
    torch.testing.assert_close(values, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(metadata["cosine"], values)


def test_hpsv2_pads_the_short_side_black_like_resize_max_size(tiny_hps):
    """A 16x32 image is already 32 on its long side: it is padded with 8 black rows above and below."""
    reward = load("hpsv2", model=str(tiny_hps), processor=str(tiny_hps / "base"))
    wide = torch.rand(1, 3, 16, 32, generator=torch.Generator().manual_seed(1))
    reward(wide, PROMPTS[:1])  # loads the models and the transform
    pixels = reward._transform(wide)
    assert pixels.shape == (1, 3, 32, 32)
    torch.testing.assert_close(pixels[:, :, 8:24], (wide - MEAN) / STD)
    torch.testing.assert_close(pixels[:, :, :8], ((0 - MEAN) / STD).expand(1, 3, 8, 32))
    torch.testing.assert_close(pixels[:, :, 24:], ((0 - MEAN) / STD).expand(1, 3, 8, 32))
    square = torch.zeros(1, 3, 32, 32)
    square[:, :, 8:24] = wide
    torch.testing.assert_close(reward(wide, PROMPTS[:1])[0], reward(square, PROMPTS[:1])[0])


@pytest.fixture(scope="module")
def tiny_imagereward(tmp_path_factory):
    from transformers import BertTokenizer

    directory = make_tiny_imagereward(tmp_path_factory.mktemp("imagereward"), seed=0)
    vocab = len(BertTokenizer.from_pretrained(directory / "tokenizer")) + 2
    return directory, tiny_blip_modules(vocab, seed=0)  # the same weights, before the published renaming


def test_imagereward_follows_the_authors_scoring(tiny_imagereward):
    from transformers import BertTokenizer

    directory, (vision, text, head) = tiny_imagereward
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    reward = load("imagereward", model=str(directory), tokenizer=str(directory / "tokenizer"))
    values, metadata = reward(images, PROMPTS)
    tokenizer = BertTokenizer.from_pretrained(directory / "tokenizer")
    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        embeds = vision(pixel_values=(images - MEAN) / STD).last_hidden_state
        hidden = text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                      encoder_hidden_states=embeds, is_decoder=False).last_hidden_state
        raw = head(hidden[:, 0])
    torch.testing.assert_close(metadata["raw"], raw, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(values, (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD, atol=1e-5, rtol=1e-4)
    assert tokens["input_ids"].shape == (2, 35) and values[0] != values[1]


def test_imagereward_resizes_the_short_side_and_crops_the_centre(tiny_imagereward):
    directory, _ = tiny_imagereward
    reward = load("imagereward", model=str(directory), tokenizer=str(directory / "tokenizer"))
    tall = torch.rand(1, 3, 48, 32, generator=torch.Generator().manual_seed(3))
    centre = tall[:, :, 8:40]
    torch.testing.assert_close(reward(tall, PROMPTS[:1])[0], reward(centre, PROMPTS[:1])[0])
    torch.testing.assert_close(reward._transform(tall), (centre - MEAN) / STD)


@pytest.mark.parametrize("name", ["hpsv2", "imagereward"])
def test_gradients_reach_the_images(name, tiny_hps, tiny_imagereward):
    options = (
        {"model": str(tiny_hps), "processor": str(tiny_hps / "base")}
        if name == "hpsv2"
        else {"model": str(tiny_imagereward[0]), "tokenizer": str(tiny_imagereward[0] / "tokenizer")}
    )
    reward = load(name, **options)
    assert reward.differentiable and name in available()
    images = torch.rand(2, 3, 40, 40, requires_grad=True)
    values, _ = reward(images, PROMPTS)
    values.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_wrong_files_are_named_errors(tmp_path, tiny_hps, tiny_imagereward, tiny_mlp):
    with pytest.raises(RewardError, match="version='v3'"):
        load("hpsv2", version="v3")
    with pytest.raises(RewardError, match="not an open_clip ViT CLIP state dict"):
        load("hpsv2", model=str(tiny_mlp), processor=str(tiny_hps / "base"))(torch.rand(1, 3, 32, 32), ["x"])
    with pytest.raises(RewardError, match="holds no ImageReward MLP head|not an ImageReward checkpoint"):
        load("imagereward", model=str(tiny_hps / "HPS_v2.1_compressed.pt"))(torch.rand(1, 3, 32, 32), ["x"])
    pickled = tmp_path / "ImageReward.pt"
    torch.save({"config": object()}, pickled)
    with pytest.raises(RewardError, match="refusing to unpickle"):
        load("imagereward", model=str(pickled))(torch.rand(1, 3, 32, 32), ["x"])
    with pytest.raises(RewardError, match="option model='nowhere'"):
        load("imagereward", model="nowhere")(torch.rand(1, 3, 32, 32), ["x"])
