"""The fine-tuned result: the model folder with its model card, and its upload to the Hugging Face Hub."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping

from accelerate import Accelerator
import huggingface_hub
import torch
from huggingface_hub import ModelCard, ModelCardData
from PIL import Image

from diffrl import checkpoint as ckpt
from diffrl._version import __version__
from diffrl.config import SharedConfig
from diffrl.pipelines.types import DiffusionPolicy


SAMPLES_FILE = "samples.png"


def sample_grid(images: torch.Tensor, columns: int = 4) -> Image.Image:
    """``[n, 3, H, W]`` images in ``[0, 1]`` as one PNG-ready grid, ``columns`` wide (2-pixel white gaps)."""
    n, _, h, w = images.shape
    rows = -(-n // columns)
    grid = Image.new("RGB", (columns * (w + 2), rows * (h + 2)), "white")
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, array in enumerate(pixels):
        grid.paste(Image.fromarray(array), ((i % columns) * (w + 2), (i // columns) * (h + 2)))
    return grid


def model_card(config: SharedConfig, metrics: Mapping[str, float], trainer: str, base_model: str | None, *,
               dataset_name: str | None = None, license: str | None = None, samples: bool = False) -> ModelCard:
    """A ``huggingface_hub.ModelCard``: metadata (``base_model``, ``library_name``, tags, license) and a body with
    a grid of what the model generates (``samples``: ``samples.png`` beside the card), the final metrics and the
    (redacted) configuration."""
    data = ModelCardData(library_name="diffusers", base_model=base_model if base_model and not os.path.isabs(base_model)
                         else None, license=license, datasets=[dataset_name] if dataset_name else None,
                         tags=["diffrl", trainer.lower(), "reinforcement-learning", "diffusion"])
    lines = [f"# {trainer} fine-tune of {base_model or 'a diffusion model'}", "",
             f"Trained with diffrl {__version__}'s {trainer} trainer.", ""]
    if samples:
        lines += ["## Samples", "", f"![samples of the fine-tuned model, fixed seeds]({SAMPLES_FILE})", ""]
    lines += ["## Final metrics", ""]
    lines += [f"- `{k}`: {v:.6g}" for k, v in sorted(metrics.items())] or ["(none logged)"]
    lines += ["", "## Configuration", "", "```yaml", config.to_yaml().rstrip(), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def save_result(accelerator: Accelerator, policy: DiffusionPolicy, config: SharedConfig, metrics: Mapping[str, float],
                trainer: str, directory: str | os.PathLike, *, samples: Image.Image | None = None,
                dataset_name: str | None = None) -> None:
    """Write the fine-tuned model (LoRA weights or a full pipeline), ``samples.png`` and a model card; all
    processes call it.

    A new folder appears only when complete (:func:`diffrl.checkpoint.write_folder_atomically`); an existing
    folder is written into, as diffusers does."""
    if accelerator.is_main_process:
        path = Path(directory)

        def write(folder: Path) -> None:
            policy.save_pretrained(folder)
            if samples is not None:
                samples.save(folder / SAMPLES_FILE)
            model_card(config, metrics, trainer, policy.base_model, dataset_name=dataset_name,
                       samples=samples is not None).save(folder / "README.md")

        if path.exists():
            write(path)
        else:
            ckpt.write_folder_atomically(path, write)
    accelerator.wait_for_everyone()


def push_folder_to_hub(directory: Path, repo_id: str, commit_message: str, private: bool | None = None) -> str:
    """Upload ``directory``; the token comes from ``HF_TOKEN`` or the login cache and is never printed."""
    api = huggingface_hub.HfApi(token=os.environ.get("HF_TOKEN") or None)
    api.create_repo(repo_id, exist_ok=True, **({} if private is None else {"private": private}))
    info = api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message=commit_message)
    return str(getattr(info, "commit_url", repo_id))


def push_result(accelerator: Accelerator, policy: DiffusionPolicy, config: SharedConfig, metrics: Mapping[str, float],
                trainer: str, repo_id: str, commit_message: str, private: bool | None = None, *,
                samples: Image.Image | None = None, dataset_name: str | None = None) -> str | None:
    """Save to a temporary folder and upload it (token from ``HF_TOKEN`` or the login cache, never logged)."""
    url = None
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "model"
        save_result(accelerator, policy, config, metrics, trainer, target, samples=samples, dataset_name=dataset_name)
        if accelerator.is_main_process:
            url = push_folder_to_hub(target, repo_id, commit_message, private)
    accelerator.wait_for_everyone()
    return url
