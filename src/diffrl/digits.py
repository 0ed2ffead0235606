"""The project's own small models for the offline quickstart: 8x8 handwritten digits.

Two models ship inside the package, both reproduced from scratch by
``scripts/pretrain_digits.py`` on scikit-learn's bundled digits dataset:

* a pixel-space DDPM (Ho et al. 2020), a ``DDPMPipeline`` folder found by
  :func:`load_digits_ddpm_path`;
* a small CNN digit classifier, :class:`DigitClassifier`, loaded by
  :func:`load_digit_classifier`.

:class:`DigitReward` turns the classifier into a reward with the TRL signature
``reward(images, prompts, prompt_metadata) -> (rewards, metadata)``: the
log-probability (or probability) the classifier gives a chosen digit. This is
the OVER50-style "make more of one thing" experiment in miniature.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = [
    "DigitClassifier",
    "DigitReward",
    "digit_shares",
    "load_digit_classifier",
    "load_digits_ddpm_path",
]

ASSETS_DIR = Path(__file__).parent / "assets" / "digits"
"""Where the shipped weights live: ``ddpm/`` (a DDPMPipeline folder) and ``classifier/``."""

NUM_CLASSES = 10
IMAGE_SIZE = 8


def _shipped(name: str) -> Path:
    path = ASSETS_DIR / name
    if not path.is_dir():
        raise FileNotFoundError(
            f"the shipped digit model folder {path} is missing; reinstall diffrl or "
            "rebuild it with `python scripts/pretrain_digits.py`"
        )
    return path


def load_digits_ddpm_path() -> Path:
    """Path of the shipped 8x8 digits DDPM, a folder ``DDPMPipeline.from_pretrained`` loads.

    Its scheduler config has ``steps_offset: 1`` and ``set_alpha_to_one: false``, so
    a DDIM scheduler built from it with ``from_config`` makes every step stochastic
    when ``eta > 0``, the last one included.
    """
    return _shipped("ddpm")


class DigitClassifier(nn.Module):
    """A small CNN over 8x8 grey digits.

    Input: ``[B, 1, H, W]`` or ``[B, 3, H, W]`` images in ``[0, 1]`` (three channels
    are averaged to one). Images whose size is not ``image_size`` are resized to it
    with area interpolation, which stays differentiable.
    Output: ``[B, num_classes]`` logits.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        num_classes: int = NUM_CLASSES,
        image_size: int = IMAGE_SIZE,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if len(channels) != 2 or image_size % 4 != 0:
            raise ValueError(
                f"DigitClassifier needs two conv widths and image_size divisible by 4, "
                f"got channels={list(channels)}, image_size={image_size}"
            )
        c0, c1 = channels
        self.config: dict[str, Any] = {
            "channels": [c0, c1],
            "hidden": hidden,
            "num_classes": num_classes,
            "image_size": image_size,
            "dropout": dropout,
        }
        self.image_size = image_size
        self.features = nn.Sequential(
            nn.Conv2d(1, c0, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c0, c0, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c0, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c1 * (image_size // 4) ** 2, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def to_grey(self, images: Tensor) -> Tensor:
        """``[B, 1|3, H, W]`` in [0, 1] -> ``[B, 1, image_size, image_size]`` in [0, 1]."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"DigitClassifier expects images [B, 1 or 3, H, W], got shape {tuple(images.shape)}"
            )
        grey = images.mean(dim=1, keepdim=True)
        if grey.shape[-2:] != (self.image_size, self.image_size):
            grey = F.interpolate(grey, size=(self.image_size, self.image_size), mode="area")
        return grey

    def forward(self, images: Tensor) -> Tensor:
        x = self.to_grey(images) * 2.0 - 1.0
        return self.head(self.features(x))

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``model.safetensors`` and ``config.json`` (no pickle) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(
            json.dumps({"class": type(self).__name__, **self.config}, indent=2) + "\n"
        )


def load_digit_classifier(
    path: str | Path | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> DigitClassifier:
    """Load a :class:`DigitClassifier` (the shipped one when ``path`` is None), in eval mode."""
    folder = Path(path) if path is not None else _shipped("classifier")
    config = json.loads((folder / "config.json").read_text())
    if config.pop("class", DigitClassifier.__name__) != DigitClassifier.__name__:
        raise ValueError(f"{folder / 'config.json'} does not describe a DigitClassifier")
    model = DigitClassifier(**config)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    model.requires_grad_(False).eval()
    return model.to(device=device, dtype=dtype)


def digit_shares(images: Tensor, classifier: DigitClassifier | None = None) -> Tensor:
    """Share of ``images`` ([B, 1|3, H, W] in [0, 1]) the classifier assigns to each digit: ``[10]``."""
    if classifier is None:
        classifier = load_digit_classifier(device=images.device)
    with torch.no_grad():
        predicted = classifier(images.to(next(classifier.parameters()).dtype)).argmax(dim=1)
    counts = torch.bincount(predicted, minlength=classifier.config["num_classes"])
    return counts.float() / max(len(predicted), 1)


class DigitReward:
    """Reward: how surely the digit classifier sees ``target`` in each image.

    ``kind="log_prob"`` gives ``log p(target | image)``; ``kind="prob"`` gives
    ``p(target | image)``. Both are differentiable in the images, so the reward
    suits reward-backprop methods (AlignProp, DRaFT) as well as DDPO. The
    classifier's weights are frozen; it runs on the images' device and dtype.
    """

    differentiable = True

    def __init__(
        self,
        target: int,
        kind: Literal["log_prob", "prob"] = "log_prob",
        classifier: DigitClassifier | None = None,
    ) -> None:
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target <= 9:
            raise ValueError(f"DigitReward target must be an int digit in 0..9, got {target!r}")
        if kind not in ("log_prob", "prob"):
            raise ValueError(f"DigitReward kind must be 'log_prob' or 'prob', got {kind!r}")
        self.target = target
        self.kind = kind
        self.classifier = classifier if classifier is not None else load_digit_classifier()
        self.classifier.requires_grad_(False).eval()

    def __call__(
        self, images: Tensor, prompts: Sequence[str] | None = None, prompt_metadata: Any = None
    ) -> tuple[Tensor, dict[str, Any]]:
        """``images [B, 3, H, W]`` in [0, 1] -> ``(rewards [B], metadata)``.

        ``metadata``: ``predicted`` (``[B]`` argmax digits) and ``target_share`` (a float).
        """
        self.classifier.to(device=images.device, dtype=images.dtype)
        log_probs = F.log_softmax(self.classifier(images), dim=1)
        rewards = log_probs[:, self.target]
        if self.kind == "prob":
            rewards = rewards.exp()
        predicted = log_probs.detach().argmax(dim=1)
        target_share = (predicted == self.target).float().mean().item()
        return rewards, {"predicted": predicted, "target_share": target_share}
