"""Images to experiment trackers, one key per kind of picture and a caption per image.

accelerate's ``log_images`` takes no captions (W&B's ``wandb.Image`` and TensorBoard's text plugin do), so each
tracker that can show a caption gets it here through its own API: W&B as ``wandb.Image(..., caption=)``,
TensorBoard as the images plus one text entry ``<key>/captions`` at the same step. Any other tracker with
``log_images`` gets the images alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["captions", "last_batch", "log_captioned_images"]


def captions(prompts: Sequence[Any], rewards: Any) -> list[str]:
    """``"<prompt> | reward <value>"`` per image (the prompt alone where there is no reward)."""
    values = torch.as_tensor(rewards).detach().float().flatten().tolist() if rewards is not None else []
    out = []
    for i, prompt in enumerate(prompts):
        text = str(prompt) if prompt not in (None, "") else "(no prompt)"
        out.append(f"{text} | reward {values[i]:.4g}" if i < len(values) else text)
    return out


def last_batch(data: Any, limit: int = 16) -> tuple[torch.Tensor, list[str]]:
    """The last sampled batch's ``[N, 3, H, W]`` images (at most ``limit``) and their captions, from DDPO's hook
    data (a list of ``[images, prompts, prompt_metadata, rewards, reward_metadata]``) or AlignProp's dict."""
    if isinstance(data, Mapping):
        images, prompts, rewards = data["images"], data.get("prompts"), data.get("rewards")
    else:
        images, prompts, _, rewards, _ = data[-1]
    images = images[:limit].detach().float().cpu()
    prompts = list(prompts or [""] * len(images))[: len(images)]
    return images, captions(prompts, rewards[: len(images)] if rewards is not None else None)


def _hwc_uint8(image: torch.Tensor) -> np.ndarray:
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def log_captioned_images(trackers: Sequence[Any], key: str, images: torch.Tensor, texts: Sequence[str],
                         step: int) -> None:
    """``images [N, 3, H, W]`` in [0, 1] under ``key`` to every tracker that shows images, with ``texts``."""
    for tracker in trackers:
        name = getattr(tracker, "name", "")
        if name == "wandb":
            import wandb

            tracker.log({key: [wandb.Image(_hwc_uint8(image), caption=text) for image, text in zip(images, texts)]},
                        step=step)
        elif name == "tensorboard":
            tracker.writer.add_images(key, images, global_step=step, dataformats="NCHW")
            table = "\n".join(f"{i}. {text}" for i, text in enumerate(texts))  # markdown list, in image order
            tracker.writer.add_text(f"{key}/captions", table, global_step=step)
        elif hasattr(tracker, "log_images"):
            tracker.log_images({key: images}, step=step)
