"""HPSv2 / HPSv2.1: the Human Preference Score v2 (Wu et al. 2023, arXiv 2306.09341).

An open_clip ViT-H/14 (LAION-2B) fine-tuned on the HPD v2 human preference pairs. The score of an image
for a prompt is the plain cosine of their L2-normalised embeddings (``image_features @ text_features.T``
in the authors' ``img_score.py``; about 0.2-0.35 for typical images, no temperature). Weights:
``HPS_v2.1_compressed.pt`` (default) or ``HPS_v2_compressed.pt`` in the Hub repo ``xswu/HPSv2``, each an
open_clip state dict under ``"state_dict"``; they are renamed to a transformers ``CLIPModel``
(:mod:`diffrl.rewards.layouts`) whose config and tokenizer come from the base model,
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. Images are preprocessed as the authors' evaluation does
(open_clip's ``ResizeMaxSize``: the longest side to 224, bicubic, padded black to a square; for square
images this is a plain resize), with OpenAI CLIP's mean and std, in torch ops: differentiable, as
AlignProp and DanceGRPO use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffrl.rewards._loading import from_pretrained, load_exactly, load_tensors, resolve_file
from diffrl.rewards.base import RewardError
from diffrl.rewards.clip import ClipSimilarity
from diffrl.rewards.layouts import clip_from_open_clip
from diffrl.rewards.preprocess import CLIP_MEAN, CLIP_STD, ImageTransform

__all__ = ["HPSv2", "HPS_FILES"]

HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
"""The checkpoint file of each HPS version in ``xswu/HPSv2``."""


class HPSv2(ClipSimilarity):
    """HPSv2.1 (or ``version="v2.0"``): cosine similarity under the HPS-fine-tuned open_clip ViT-H/14.

    ``model`` is a Hub repo id, a local folder holding the checkpoint, or the checkpoint file itself;
    ``checkpoint`` overrides the file name that ``version`` picks. ``processor`` names the transformers CLIP
    repo that supplies the architecture config, the tokenizer and the input size.
    """

    def __init__(
        self,
        *,
        model: str = "xswu/HPSv2",
        version: str = "v2.1",
        checkpoint: str | None = None,
        processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        device: str | None = None,
        dtype: str | None = None,
    ) -> None:
        if version not in HPS_FILES:
            raise RewardError(f"reward 'hpsv2': option version={version!r} must be one of {sorted(HPS_FILES)}")
        self.version = version
        self.checkpoint = checkpoint or HPS_FILES[version]
        super().__init__(name="hpsv2", model=model, processor=processor, scale=1.0, device=device, dtype=dtype)

    def _load_clip(self, dtype: torch.dtype) -> Any:
        from transformers import CLIPConfig, CLIPModel

        path = resolve_file(self.model, self.checkpoint, reward=self.name, setting="model")
        saved = load_tensors(path, reward=self.name, setting="model")
        state = saved.get("state_dict", saved) if isinstance(saved, Mapping) else saved
        if not isinstance(state, Mapping):
            raise RewardError(f"reward 'hpsv2': {str(path)!r} holds no state dict")
        state = {key.removeprefix("module."): value for key, value in state.items()}  # saved from DDP
        try:
            renamed = clip_from_open_clip(state)
        except KeyError as error:
            raise RewardError(f"reward 'hpsv2': {str(path)!r} is {error.args[0]}") from error
        config = from_pretrained(CLIPConfig, self.processor, reward=self.name, setting="processor")
        clip = CLIPModel(config)
        load_exactly(clip, renamed, reward=self.name, source=f"{str(path)!r}", target=f"processor={self.processor!r}")
        return clip.to(dtype)

    def _image_transform(self, image_processor: Any) -> ImageTransform:
        # The input size is the base processor's crop; the resize is open_clip's ResizeMaxSize, not the processor's.
        crop = ImageTransform.from_processor(image_processor).crop or (224, 224)
        return ImageTransform(shortest_edge=None, longest_edge=crop[0], crop=crop, mean=CLIP_MEAN, std=CLIP_STD)
