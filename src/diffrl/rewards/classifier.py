"""Rewards from an off-the-shelf image classifier.

Any transformers ``AutoModelForImageClassification`` checkpoint: the reward is the sum
of the logits (or probabilities) of chosen classes. The ``over50`` preset is
ddpo-celebahq's OVER50 task (seed ``002``): ``nateraw/vit-age-classifier`` (FairFace
age buckets 0-2, 3-9, ..., 60-69, 70+), summing the logits of classes 6 and up
(50 years and older). Images are preprocessed in torch ops following the
checkpoint's processor config, so the reward is differentiable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffrl.rewards._loading import ModelReward, freeze, from_pretrained, place
from diffrl.rewards.base import PromptMetadata, Prompts, RewardError, RewardOutput, check_choice
from diffrl.rewards.preprocess import ImageTransform

__all__ = ["ClassifierReward", "classifier", "over50"]

OUTPUTS = ("logits", "probabilities")


class ClassifierReward(ModelReward):
    """Sum over ``classes`` of a classifier's logits (``output="logits"``) or probabilities.

    ``classes`` are indices or label names (from the checkpoint's ``id2label``),
    resolved when the model loads. Metadata ``probability`` is the summed probability
    of the chosen classes whatever ``output`` is (e.g. the share of faces over 50).
    """

    differentiable = True

    def __init__(
        self,
        *,
        model: str,
        classes: Sequence[int | str],
        output: str = "logits",
        processor: str | None = None,
        name: str = "classifier",
        device: str | None = None,
        dtype: str | None = None,
    ) -> None:
        check_choice(output, OUTPUTS, reward=name, setting="output")
        if isinstance(classes, (str, int)) or not isinstance(classes, Sequence) or len(classes) == 0:
            raise RewardError(
                f"reward '{name}': option classes={classes!r} must be a non-empty list of class indices or label names"
            )
        for entry in classes:
            if isinstance(entry, bool) or not isinstance(entry, (int, str)):
                raise RewardError(f"reward '{name}': option classes has {entry!r}; use class indices or label names")
        self.name, self.model, self.processor = name, model, processor or model
        self.classes, self.output = list(classes), output
        super().__init__(device=device, dtype=dtype)
        self._classifier: Any = None
        self._indices: list[int] = []
        self._transform: ImageTransform | None = None

    def _resolve_classes(self, id2label: Mapping[int, str]) -> list[int]:
        label2id = {label: index for index, label in id2label.items()}
        indices = []
        for entry in self.classes:
            index = label2id.get(entry) if isinstance(entry, str) else entry
            if index is None or not 0 <= index < len(id2label):
                raise RewardError(
                    f"reward '{self.name}': class {entry!r} is not one of model {self.model!r}'s "
                    f"{len(id2label)} classes {dict(id2label)}; fix option classes"
                )
            indices.append(int(index))
        return indices

    def _load(self, dtype: torch.dtype) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        model = from_pretrained(
            AutoModelForImageClassification, self.model, reward=self.name, setting="model", dtype=dtype
        )
        self._indices = self._resolve_classes({int(k): v for k, v in model.config.id2label.items()})
        image_processor = from_pretrained(AutoImageProcessor, self.processor, reward=self.name, setting="processor")
        self._transform = ImageTransform.from_processor(image_processor)
        self._classifier = freeze(model)

    def score_images(self, images: torch.Tensor, prompts: Prompts, prompt_metadata: PromptMetadata) -> RewardOutput:
        device, dtype = self._prepare(images)
        model = place(self._classifier, device, dtype)
        logits = model(pixel_values=self._transform(images.to(device), dtype)).logits.float()
        chosen = torch.tensor(self._indices, device=device)
        probability = torch.softmax(logits, dim=-1).index_select(-1, chosen).sum(-1)
        scores = logits.index_select(-1, chosen).sum(-1) if self.output == "logits" else probability
        return scores.to(images.device), {"probability": probability.detach().to(images.device)}


def classifier(
    *,
    model: str,
    classes: Sequence[int | str],
    output: str = "logits",
    processor: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> ClassifierReward:
    """Sum of the ``output`` ("logits" or "probabilities") of ``classes`` under ``model``."""
    return ClassifierReward(
        model=model, classes=classes, output=output, processor=processor, device=device, dtype=dtype
    )


def over50(
    *,
    model: str = "nateraw/vit-age-classifier",
    output: str = "logits",
    device: str | None = None,
    dtype: str | None = None,
) -> ClassifierReward:
    """ddpo-celebahq's OVER50: sum of the age classifier's logits for classes 6, 7, 8 (50-59, 60-69, 70+)."""
    return ClassifierReward(
        name="over50", model=model, classes=[6, 7, 8], output=output, device=device, dtype=dtype
    )
