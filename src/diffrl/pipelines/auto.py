"""Pick the policy class (the model family) for a model, from its small files."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from diffrl.pipelines.ddpm import DDPMPolicy
from diffrl.pipelines.loading import SINGLE_FILE_SUFFIXES, ModelLoadError, read_model_index
from diffrl.pipelines.saved import read_model_info
from diffrl.pipelines.flux import FluxPolicy
from diffrl.pipelines.stable_diffusion import StableDiffusionPolicy
from diffrl.pipelines.stable_diffusion_3 import StableDiffusion3Policy
from diffrl.pipelines.stable_diffusion_xl import StableDiffusionXLPolicy, is_sdxl_single_file

FAMILIES: tuple[type, ...] = (DDPMPolicy, StableDiffusionXLPolicy, StableDiffusion3Policy, FluxPolicy,
                               StableDiffusionPolicy)
"""Every model family; the first whose ``pipeline_class_names`` holds a model's pipeline class loads it, Stable
Diffusion is the fallback (diffusers' own SD-compatible pipelines)."""


def policy_class(kind: str) -> type:
    """The family recorded as ``kind`` in ``diffrl_model.json`` (a ``ModelLoadError`` for an unknown one)."""
    for family in FAMILIES:
        if family.kind == kind:
            return family
    raise ModelLoadError(f"a diffrl model of unknown kind {kind!r}; this diffrl knows "
                         f"{', '.join(f.kind for f in FAMILIES)}.")


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
        kind = next((f.kind for f in FAMILIES if cls_name in f.pipeline_class_names), StableDiffusionPolicy.kind)
    return kind


def load_policy(name_or_path: str | os.PathLike, *, revision: str = "main", **kwargs: Any):
    """The policy of the model's family (:func:`model_kind`): ``DDPMPolicy`` for DDPM/DDIM pipelines and diffrl
    DDPM results, ``StableDiffusionXLPolicy`` for SDXL pipelines, single files and results,
    ``StableDiffusionPolicy`` otherwise. ``sampler`` goes to families that take it (DDPMs)."""
    name = os.fspath(name_or_path)
    family = policy_class(model_kind(name, revision))
    if "sampler" not in inspect.signature(family.__init__).parameters:
        kwargs.pop("sampler", None)
    return family.from_pretrained(name, revision=revision, **kwargs)
