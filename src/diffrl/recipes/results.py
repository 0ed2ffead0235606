"""The fine-tuned result: the model folder with its model card, and its upload to the Hugging Face Hub."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping

from accelerate import Accelerator
import huggingface_hub
from huggingface_hub import ModelCard, ModelCardData

from diffrl import checkpoint as ckpt
from diffrl._version import __version__
from diffrl.config import SharedConfig
from diffrl.pipelines.types import DiffusionPolicy


def model_card(config: SharedConfig, metrics: Mapping[str, float], trainer: str, base_model: str | None, *,
               dataset_name: str | None = None, license: str | None = None) -> ModelCard:
    """A ``huggingface_hub.ModelCard``: metadata (``base_model``, ``library_name``, tags, license) and a body with
    the final metrics and the (redacted) configuration."""
    data = ModelCardData(library_name="diffusers", base_model=base_model if base_model and not os.path.isabs(base_model)
                         else None, license=license, datasets=[dataset_name] if dataset_name else None,
                         tags=["diffrl", trainer.lower(), "reinforcement-learning", "diffusion"])
    lines = [f"# {trainer} fine-tune of {base_model or 'a diffusion model'}", "",
             f"Trained with diffrl {__version__}'s {trainer} trainer.", "", "## Final metrics", ""]
    lines += [f"- `{k}`: {v:.6g}" for k, v in sorted(metrics.items())] or ["(none logged)"]
    lines += ["", "## Configuration", "", "```yaml", config.to_yaml().rstrip(), "```", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def save_result(accelerator: Accelerator, policy: DiffusionPolicy, config: SharedConfig, metrics: Mapping[str, float],
                trainer: str, directory: str | os.PathLike) -> None:
    """Write the fine-tuned model (LoRA weights or a full pipeline) and a model card; all processes call it.

    A new folder appears only when complete (:func:`diffrl.checkpoint.write_folder_atomically`); an existing
    folder is written into, as diffusers does."""
    if accelerator.is_main_process:
        path = Path(directory)

        def write(folder: Path) -> None:
            policy.save_pretrained(folder)
            model_card(config, metrics, trainer, policy.base_model).save(folder / "README.md")

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
                trainer: str, repo_id: str, commit_message: str, private: bool | None = None) -> str | None:
    """Save to a temporary folder and upload it (token from ``HF_TOKEN`` or the login cache, never logged)."""
    url = None
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "model"
        save_result(accelerator, policy, config, metrics, trainer, target)
        if accelerator.is_main_process:
            url = push_folder_to_hub(target, repo_id, commit_message, private)
    accelerator.wait_for_everyone()
    return url
