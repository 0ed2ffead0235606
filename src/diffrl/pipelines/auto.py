"""Pick the policy class for a model: Stable Diffusion or unconditional DDPM."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from diffrl.pipelines.ddpm import DDPMPolicy
from diffrl.pipelines.loading import SINGLE_FILE_SUFFIXES, ModelLoadError, read_model_index
from diffrl.pipelines.saved import read_model_info
from diffrl.pipelines.stable_diffusion import StableDiffusionPolicy
from diffrl.pipelines.stable_diffusion_xl import StableDiffusionXLPolicy, is_sdxl_single_file

_UNCONDITIONAL = {"DDPMPipeline", "DDIMPipeline"}


def _pipeline_class(name_or_path: str, revision: str) -> str | None:
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        return "StableDiffusionXLPipeline" if is_sdxl_single_file(path) else "StableDiffusionPipeline"
    if path.is_dir():
        return read_model_index(path).get("_class_name") if (path / "model_index.json").is_file() else None
    try:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(name_or_path, revision=revision).get("_class_name")
    except Exception:  # noqa: BLE001 - the policy's own loader reports the failure with what it tried
        return None


def model_kind(name_or_path: str | os.PathLike, revision: str = "main") -> str:
    """``"ddpm"``, ``"sdxl"`` or ``"stable_diffusion"`` (or a diffrl result's recorded kind), read from the small
    files only (``diffrl_model.json``, ``model_index.json``, a single file's key names): no weights load."""
    name = os.fspath(name_or_path)
    info = read_model_info(name, revision)
    kind = info.get("kind") if info else None
    if kind is None:
        cls_name = _pipeline_class(name, revision)
        kind = "ddpm" if cls_name in _UNCONDITIONAL else "sdxl" if cls_name == "StableDiffusionXLPipeline" else "stable_diffusion"
    return kind


def load_policy(name_or_path: str | os.PathLike, *, revision: str = "main", **kwargs: Any):
    """``DDPMPolicy`` for DDPM/DDIM pipelines and diffrl DDPM results, ``StableDiffusionXLPolicy`` for SDXL
    pipelines (``model_index.json``), single files and results, ``StableDiffusionPolicy`` otherwise."""
    name = os.fspath(name_or_path)
    kind = model_kind(name, revision)
    if kind == "ddpm":
        return DDPMPolicy.from_pretrained(name, revision=revision, **kwargs)
    kwargs.pop("sampler", None)
    if kind == "sdxl":
        return StableDiffusionXLPolicy.from_pretrained(name, revision=revision, **kwargs)
    if kind != "stable_diffusion":
        raise ModelLoadError(f"'{name}' holds a diffrl model of unknown kind {kind!r}.")
    return StableDiffusionPolicy.from_pretrained(name, revision=revision, **kwargs)
