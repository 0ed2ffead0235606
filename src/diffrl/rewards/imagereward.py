"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation", NeurIPS 2023; the reward ReFL trains on).

A BLIP ViT-L/16 encodes the image; BLIP's BERT text encoder reads the prompt while cross-attending to it;
an MLP (1024-128-64-16-1 after the 768-d [CLS] state, dropout, no activations: the same layout as LAION's
aesthetic head) maps the [CLS] state to a score, normalised by the training set's mean 0.16717362830052426
and std 1.0333394966054072 (so about N(0, 1) over generated images). Prompts are tokenised with BLIP's
``bert-base-uncased`` tokenizer (plus its ``[DEC]`` and ``[ENC]`` tokens), padded to 35 tokens; images are
resized (shortest side, bicubic), center-cropped to 224 and normalised with OpenAI CLIP's statistics, all
as in the authors' ``ImageReward.score``. Weights: ``ImageReward.pt`` in the Hub repo ``THUDM/ImageReward``,
renamed to transformers' ``BlipVisionModel`` / ``BlipTextModel`` (:mod:`diffrl.rewards.layouts`).
Preprocessing runs in torch ops, so the reward is differentiable (ReFL backpropagates it).
"""

from __future__ import annotations

from typing import Any

import torch

from diffrl.rewards._loading import ModelReward, freeze, from_pretrained, load_exactly, load_tensors, place, resolve_file
from diffrl.rewards.aesthetic import AestheticMLP
from diffrl.rewards.base import PromptMetadata, Prompts, RewardError, RewardOutput
from diffrl.rewards.layouts import blip_from_original, blip_widths
from diffrl.rewards.preprocess import CLIP_MEAN, CLIP_STD, ImageTransform

__all__ = ["ImageRewardScore", "IMAGEREWARD_MEAN", "IMAGEREWARD_STD", "PROMPT_TOKENS"]

IMAGEREWARD_MEAN = 0.16717362830052426
"""Mean of the raw MLP output over ImageReward's training images (subtracted from every score)."""
IMAGEREWARD_STD = 1.0333394966054072
"""Standard deviation of the raw MLP output over ImageReward's training images (divides every score)."""
PROMPT_TOKENS = 35
"""Prompts are padded/truncated to this many tokens, as in the authors' scoring code."""


class ImageRewardScore(ModelReward):
    """ImageReward of each (image, prompt) pair: about N(0, 1) over generated images; higher is preferred.

    ``model`` is a Hub repo id, a local folder holding ``checkpoint``, or the checkpoint file itself;
    ``tokenizer`` the BERT tokenizer BLIP extends.
    """

    name = "imagereward"
    differentiable = True
    needs_prompts = True

    def __init__(
        self,
        *,
        model: str = "THUDM/ImageReward",
        checkpoint: str = "ImageReward.pt",
        tokenizer: str = "bert-base-uncased",
        device: str | None = None,
        dtype: str | None = None,
    ) -> None:
        self.model, self.checkpoint, self.tokenizer = model, checkpoint, tokenizer
        super().__init__(device=device, dtype=dtype)
        self._vision: Any = None
        self._text: Any = None
        self._head: AestheticMLP | None = None
        self._tokenizer: Any = None
        self._transform: ImageTransform | None = None

    def _load(self, dtype: torch.dtype) -> None:
        from transformers import AutoTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        path = resolve_file(self.model, self.checkpoint, reward=self.name, setting="model")
        state = load_tensors(path, reward=self.name, setting="model")
        try:
            vision_state, text_state, head_state = blip_from_original(state)
            sizes = blip_widths(vision_state, text_state)
        except (KeyError, AttributeError) as error:
            raise RewardError(f"reward 'imagereward': {str(path)!r} is not an ImageReward checkpoint ({error})") from error
        vision = BlipVisionModel(BlipVisionConfig(
            hidden_size=sizes["vision_width"],
            intermediate_size=sizes["vision_intermediate"],
            num_hidden_layers=sizes["vision_layers"],
            num_attention_heads=max(1, sizes["vision_width"] // 64),
            image_size=sizes["image_size"],
            patch_size=sizes["patch_size"],
            hidden_act="gelu",
            layer_norm_eps=1e-6,  # BLIP's ViT (timm) uses eps 1e-6
        ))
        text = BlipTextModel(BlipTextConfig(
            vocab_size=sizes["vocab_size"],
            hidden_size=sizes["text_width"],
            intermediate_size=sizes["text_intermediate"],
            num_hidden_layers=sizes["text_layers"],
            num_attention_heads=max(1, sizes["text_width"] // 64),
            max_position_embeddings=sizes["max_positions"],
            encoder_hidden_size=sizes["encoder_width"],
            is_decoder=True,  # builds the cross-attention layers; the forward below runs bidirectionally
            layer_norm_eps=1e-12,
        ), add_pooling_layer=False)
        source = f"{str(path)!r}"
        load_exactly(vision, vision_state, reward=self.name, source=source, target="BLIP's ViT")
        load_exactly(text, text_state, reward=self.name, source=source, target="BLIP's text encoder")
        try:
            widths = [head_state["layers.0.weight"].shape[1]]
            widths += [head_state[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6, 7)]
        except KeyError as error:
            raise RewardError(f"reward 'imagereward': {source} holds no ImageReward MLP head (mlp.layers.*)") from error
        head = AestheticMLP(widths)
        load_exactly(head, head_state, reward=self.name, source=source, target="ImageReward's MLP head")
        tokenizer = from_pretrained(AutoTokenizer, self.tokenizer, reward=self.name, setting="tokenizer")
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's init_tokenizer, in its order
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        if len(tokenizer) > sizes["vocab_size"]:
            raise RewardError(
                f"reward 'imagereward': tokenizer={self.tokenizer!r} has {len(tokenizer)} tokens but the text encoder "
                f"embeds {sizes['vocab_size']}; give the tokenizer the checkpoint was trained with (bert-base-uncased)"
            )
        self._vision, self._text, self._head = freeze(vision.to(dtype)), freeze(text.to(dtype)), freeze(head)
        self._tokenizer = tokenizer
        size = sizes["image_size"]
        self._transform = ImageTransform(shortest_edge=size, crop=(size, size), mean=CLIP_MEAN, std=CLIP_STD)

    def score_images(self, images: torch.Tensor, prompts: Prompts, prompt_metadata: PromptMetadata) -> RewardOutput:
        device, dtype = self._prepare(images)
        vision, text, head = place(self._vision, device, dtype), place(self._text, device, dtype), self._head
        head = place(head, device, torch.float32)  # the authors score the head in float32 (.float())
        image_embeds = vision(pixel_values=self._transform(images.to(device), dtype)).last_hidden_state
        tokens = self._tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=PROMPT_TOKENS, return_tensors="pt"
        ).to(device)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
        hidden = text(
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        ).last_hidden_state
        raw = head(hidden[:, 0, :].float())
        scores = (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
        return scores.to(device=images.device, dtype=torch.float32), {"raw": raw.detach().to(images.device)}
