"""Image features for measuring diversity: flattened pixels, or CLIP image embeddings when a CLIP model is given."""

from __future__ import annotations

from typing import Any, Mapping, Protocol

import torch

from diffrl.rewards.preprocess import ImageTransform
from diffrl.rewards.aesthetic import AestheticScore
from diffrl.rewards.clip import ClipSimilarity
from diffrl.metrics import DistanceMetric


class FeatureError(ValueError):
    """The feature model could not be loaded; the message names the setting and the fix."""


class ImageFeatures(Protocol):
    """``features(images [B, 3, H, W] in [0, 1]) -> [B, D]`` (float32, CPU), compared with ``metric``."""

    name: str
    metric: DistanceMetric

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class PixelFeatures:
    """The images themselves, flattened: diversity is the mean RMS pixel difference between samples."""

    name = "pixels"
    metric: DistanceMetric = "rms"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.detach().float().flatten(1).cpu()


class ClipFeatures:
    """CLIP image embeddings (``visual_projection`` of the vision tower's pooled output), compared by cosine distance.

    ``model`` is a Hub id or a folder written by ``CLIPModel.save_pretrained`` (e.g.
    ``openai/clip-vit-large-patch14``); its image-processor config comes from ``processor`` (default: ``model``).
    Both load on first use, onto the images' device.
    """

    metric: DistanceMetric = "cosine"

    def __init__(self, model: str, *, processor: str | None = None, setting: str = "--clip-model") -> None:
        self.model = model
        self.processor = processor or model
        self.setting = setting
        self.name = f"clip:{model}"
        self._clip: Any = None
        self._transform: Any = None

    def _load(self) -> None:
        from transformers import AutoImageProcessor, CLIPModel


        try:
            clip = CLIPModel.from_pretrained(self.model)
            processor = AutoImageProcessor.from_pretrained(self.processor)
        except (OSError, ValueError) as err:
            raise FeatureError(
                f"{self.setting} {self.model!r} could not be loaded as a CLIP model with its image processor ({err}). "
                "Give a Hub id such as openai/clip-vit-large-patch14 or a folder written by CLIPModel.save_pretrained; "
                "leave it out to measure diversity on pixels."
            ) from err
        self._clip = clip.eval().requires_grad_(False)
        self._transform = ImageTransform.from_processor(processor)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self._clip is None:
            self._load()
        clip = self._clip
        if next(clip.parameters()).device != images.device:
            clip.to(images.device)
        pixels = self._transform(images.float(), next(clip.parameters()).dtype)
        embeddings = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
        return embeddings.float().cpu()


AUTO = "auto"
PIXELS = "pixels"


def reward_clip(rewards: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """``(reward name, CLIP model, image processor)`` of the first evaluated reward built on a CLIP model
    (``aesthetic``: its ``clip_model``; ``clip_score``/``pickscore``: their ``model`` and ``processor``)."""

    for name, reward in rewards.items():
        if isinstance(reward, AestheticScore):
            return name, reward.clip_model, reward.clip_model
        if isinstance(reward, ClipSimilarity):
            return name, reward.model, reward.processor
    return None


def image_features(clip_model: str | None = AUTO, rewards: Mapping[str, Any] | None = None) -> ImageFeatures:
    """The features diversity is measured on.

    ``clip_model``: a CLIP Hub id or folder; ``"pixels"`` (or ``None``) for pixels; ``"auto"``: the CLIP model of a
    CLIP-based reward among ``rewards`` when there is one (it is a CLIP model the user has), else pixels.
    """
    if clip_model in (None, PIXELS):
        return PixelFeatures()
    if clip_model == AUTO:
        found = reward_clip(rewards or {})
        if found is None:
            return PixelFeatures()
        name, model, processor = found
        return ClipFeatures(model, processor=processor, setting=f"the CLIP model of reward '{name}'")
    return ClipFeatures(clip_model)
