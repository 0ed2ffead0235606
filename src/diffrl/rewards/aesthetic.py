"""The LAION aesthetic score: an MLP on CLIP ViT-L/14 image embeddings.

The "improved aesthetic predictor" (Schuhmann et al., LAION, 2022;
github.com/christophschuhmann/improved-aesthetic-predictor) regresses a 1-10 rating
from the L2-normalised CLIP ViT-L/14 image embedding with a 768-1024-128-64-16-1 MLP
(dropout between the first layers, no activations). DDPO and AlignProp use it as a
reward. Its weights ship as ``sac+logos+ava1-l14-linearMSE.pth``, a state dict with
keys ``layers.{0,2,4,6,7}.{weight,bias}`` (the Linear layers of an ``nn.Sequential``);
:class:`AestheticMLP` keeps those names so the file loads as is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffrl.rewards._loading import ModelReward, freeze, from_pretrained, load_tensors, place, resolve_file
from diffrl.rewards.base import PromptMetadata, Prompts, RewardError, RewardOutput
from diffrl.rewards.preprocess import ImageTransform, to_uint8_arrays

__all__ = ["AestheticMLP", "AestheticScore", "load_aesthetic_mlp"]

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_MLP_REPO = "trl-lib/ddpo-aesthetic-predictor"
DEFAULT_MLP_FILE = "aesthetic-model.pth"
_LINEAR_INDICES = (0, 2, 4, 6, 7)
_DROPOUT = {1: 0.2, 3: 0.2, 5: 0.1}


class AestheticMLP(nn.Module):
    """LAION's MLP head: Linear, Dropout(0.2), Linear, Dropout(0.2), Linear, Dropout(0.1), Linear, Linear."""

    def __init__(self, widths: Sequence[int] = (768, 1024, 128, 64, 16, 1)) -> None:
        super().__init__()
        if len(widths) != len(_LINEAR_INDICES) + 1:
            raise ValueError(f"AestheticMLP needs {len(_LINEAR_INDICES) + 1} widths, got {list(widths)}")
        modules: list[nn.Module] = []
        linear = 0
        for index in range(_LINEAR_INDICES[-1] + 1):
            if index in _LINEAR_INDICES:
                modules.append(nn.Linear(widths[linear], widths[linear + 1]))
                linear += 1
            else:
                modules.append(nn.Dropout(_DROPOUT[index]))
        self.layers = nn.Sequential(*modules)

    @property
    def input_size(self) -> int:
        return self.layers[0].in_features

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` (L2-normalised) embeddings -> ``[B]`` scores."""
        return self.layers(embeddings).squeeze(-1)


def load_aesthetic_mlp(path: str | Path) -> AestheticMLP:
    """Load LAION-layout MLP weights from a ``.safetensors`` or ``.pth`` file without executing pickle code.

    ``.pth`` files go through ``torch.load(weights_only=True)``, which refuses anything but
    tensors and plain containers.
    """
    state = load_tensors(Path(path), reward="aesthetic", setting="mlp")
    expected = {f"layers.{i}.{p}" for i in _LINEAR_INDICES for p in ("weight", "bias")}
    if not isinstance(state, Mapping) or set(state) != expected:
        found = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise RewardError(
            f"reward 'aesthetic': {str(path)!r} does not hold the LAION aesthetic MLP; expected keys "
            f"{sorted(expected)}, found {found}"
        )
    widths = [state["layers.0.weight"].shape[1]] + [state[f"layers.{i}.weight"].shape[0] for i in _LINEAR_INDICES]
    mlp = AestheticMLP(widths)
    mlp.load_state_dict(state)
    return mlp


class AestheticScore(ModelReward):
    """LAION aesthetic score of each image (about 1-10; higher is prettier).

    ``differentiable=True`` preprocesses with torch ops (:class:`ImageTransform`) so
    gradients reach the images; ``differentiable=False`` runs under ``torch.no_grad``
    with the checkpoint's own PIL image processor, exactly as the published scores
    were computed. ``mlp`` is a Hub repo id (with ``mlp_file``), a local directory
    holding ``mlp_file``, or a weights file.
    """

    name = "aesthetic"

    def __init__(
        self,
        *,
        clip_model: str = DEFAULT_CLIP,
        mlp: str = DEFAULT_MLP_REPO,
        mlp_file: str = DEFAULT_MLP_FILE,
        differentiable: bool = True,
        device: str | None = None,
        dtype: str | None = None,
    ) -> None:
        if not isinstance(differentiable, bool):
            raise RewardError(f"reward 'aesthetic': option differentiable={differentiable!r} must be true or false")
        self.clip_model, self.mlp, self.mlp_file = clip_model, mlp, mlp_file
        self.differentiable = differentiable
        super().__init__(device=device, dtype=dtype)
        self._clip: Any = None
        self._head: AestheticMLP | None = None
        self._processor: Any = None
        self._transform: ImageTransform | None = None

    def _load(self, dtype: torch.dtype) -> None:
        from transformers import AutoImageProcessor, CLIPModel

        clip = from_pretrained(CLIPModel, self.clip_model, reward=self.name, setting="clip_model", dtype=dtype)
        head = load_aesthetic_mlp(resolve_file(self.mlp, self.mlp_file, reward=self.name, setting="mlp"))
        if head.input_size != clip.config.projection_dim:
            raise RewardError(
                f"reward 'aesthetic': the MLP expects {head.input_size}-d embeddings but "
                f"clip_model={self.clip_model!r} "
                f"projects to {clip.config.projection_dim}; LAION's MLP goes with openai/clip-vit-large-patch14"
            )
        processor = from_pretrained(AutoImageProcessor, self.clip_model, reward=self.name, setting="clip_model")
        self._clip, self._head = freeze(clip), freeze(head)
        self._processor, self._transform = processor, ImageTransform.from_processor(processor)

    def score_images(self, images: torch.Tensor, prompts: Prompts, prompt_metadata: PromptMetadata) -> RewardOutput:
        device, dtype = self._prepare(images)
        clip, head = place(self._clip, device, dtype), place(self._head, device, dtype)
        if self.differentiable:
            pixels = self._transform(images.to(device), dtype)
            embeddings = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
        else:
            with torch.no_grad():
                pixels = self._processor(images=to_uint8_arrays(images), return_tensors="pt")["pixel_values"]
                pixels = pixels.to(device, dtype)
                embeddings = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            embeddings = embeddings / torch.linalg.vector_norm(embeddings, dim=-1, keepdim=True)
            scores = head(embeddings)
        return scores.to(device=images.device, dtype=torch.float32), {}

