"""Prompt-image similarity under a CLIP model: CLIP score and PickScore.

Both embed the image and its prompt with a transformers ``CLIPModel`` and score
their cosine similarity times a scale:

- **CLIP score** (Hessel et al. 2021, "CLIPScore"; torchmetrics' ``CLIPScore``):
  ``100 * cos(image, prompt)`` under ``openai/clip-vit-large-patch14``. Unlike
  torchmetrics we do not clamp negative similarities at 0, so the gradient never vanishes.
- **PickScore** (Kirstain et al. 2023, "Pick-a-Pic"): a CLIP-H/14 fine-tuned on human
  preferences, ``yuvalkirstain/PickScore_v1`` with the processor of
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; the score is ``exp(logit_scale) * cos``
  (about 20-23 for typical images), as in the authors' inference code.

Images are preprocessed in torch ops, so both are differentiable.
"""

from __future__ import annotations

from typing import Any

import torch

from diffrl.rewards._loading import ModelReward, freeze, from_pretrained, place
from diffrl.rewards.base import PromptMetadata, Prompts, RewardError, RewardOutput
from diffrl.rewards.preprocess import ImageTransform

__all__ = ["ClipSimilarity", "clip_score", "pickscore"]


class ClipSimilarity(ModelReward):
    """``scale * cos(image_embedding, prompt_embedding)`` per image, under a transformers ``CLIPModel``.

    ``scale`` is a number, or ``"logit_scale"`` for the model's learned temperature
    ``exp(logit_scale)``. ``processor`` (default: ``model``) supplies the tokenizer and
    the image-processor config that :class:`ImageTransform` follows.
    """

    differentiable = True
    needs_prompts = True

    def __init__(
        self,
        *,
        name: str,
        model: str,
        processor: str | None = None,
        scale: float | str = 100.0,
        device: str | None = None,
        dtype: str | None = None,
    ) -> None:
        if scale != "logit_scale" and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise RewardError(f"reward '{name}': option scale={scale!r} must be a number or 'logit_scale'")
        self.name, self.model, self.processor = name, model, processor or model
        self.scale = scale
        super().__init__(device=device, dtype=dtype)
        self._clip: Any = None
        self._tokenizer: Any = None
        self._transform: ImageTransform | None = None

    def _load(self, dtype: torch.dtype) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer

        self._clip = freeze(self._load_clip(dtype))
        self._tokenizer = from_pretrained(AutoTokenizer, self.processor, reward=self.name, setting="processor")
        image_processor = from_pretrained(AutoImageProcessor, self.processor, reward=self.name, setting="processor")
        self._transform = self._image_transform(image_processor)

    def _load_clip(self, dtype: torch.dtype) -> Any:
        """The ``CLIPModel`` (a subclass loads another layout here)."""
        from transformers import CLIPModel

        return from_pretrained(CLIPModel, self.model, reward=self.name, setting="model", dtype=dtype)

    def _image_transform(self, image_processor: Any) -> ImageTransform:
        """The preprocessing the scores were published with (here: the processor's own)."""
        return ImageTransform.from_processor(image_processor)

    def score_images(self, images: torch.Tensor, prompts: Prompts, prompt_metadata: PromptMetadata) -> RewardOutput:
        device, dtype = self._prepare(images)
        clip = place(self._clip, device, dtype)
        pixels = self._transform(images.to(device), dtype)
        image_embeddings = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
        with torch.no_grad():
            tokens = self._tokenizer(
                prompts,
                padding=True,
                truncation=True,
                max_length=clip.config.text_config.max_position_embeddings,
                return_tensors="pt",
            ).to(device)
            text = clip.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            text_embeddings = clip.text_projection(text.pooler_output)
            text_embeddings = text_embeddings / torch.linalg.vector_norm(text_embeddings, dim=-1, keepdim=True)
            scale = clip.logit_scale.exp() if self.scale == "logit_scale" else torch.tensor(float(self.scale))
        image_embeddings = image_embeddings / torch.linalg.vector_norm(image_embeddings, dim=-1, keepdim=True)
        cosine = (image_embeddings * text_embeddings).sum(-1)
        scores = scale.to(cosine) * cosine
        metadata = {"cosine": cosine.detach().float().to(images.device)}
        return scores.to(device=images.device, dtype=torch.float32), metadata


def clip_score(
    *,
    model: str = "openai/clip-vit-large-patch14",
    processor: str | None = None,
    scale: float | str = 100.0,
    device: str | None = None,
    dtype: str | None = None,
) -> ClipSimilarity:
    """CLIP score: ``scale * cos(image, prompt)`` (default ``100 *``, torchmetrics' convention, unclamped)."""
    return ClipSimilarity(name="clip_score", model=model, processor=processor, scale=scale, device=device, dtype=dtype)


def pickscore(
    *,
    model: str = "yuvalkirstain/PickScore_v1",
    processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    device: str | None = None,
    dtype: str | None = None,
) -> ClipSimilarity:
    """PickScore (Kirstain et al. 2023): ``exp(logit_scale) * cos(image, prompt)`` under the PickScore CLIP-H."""
    return ClipSimilarity(
        name="pickscore", model=model, processor=processor, scale="logit_scale", device=device, dtype=dtype
    )
