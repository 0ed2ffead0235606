"""Find and load a diffusers pipeline from a Hub id, a local folder or a single-file checkpoint.

Every failure is a :class:`ModelLoadError` that names the path or id and says what was tried.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

import huggingface_hub.constants as hub_constants
from diffusers import AutoencoderKL, DiffusionPipeline

P = TypeVar("P", bound=DiffusionPipeline)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class ModelLoadError(OSError):
    """A model could not be found or loaded; the message names the source and what was tried."""


def read_json_file(file: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``file``; unreadable or corrupt JSON is a :class:`ModelLoadError` naming the file."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"The {what} '{file}' is not valid JSON ({err}). The model folder is damaged or "
                             "half-written: save or download it again.") from err
    if not isinstance(value, dict):
        raise ModelLoadError(f"The {what} '{file}' holds a JSON {type(value).__name__}, not an object; the model "
                             "folder is damaged: save or download it again.")
    return value


def read_model_index(folder: Path) -> dict[str, Any]:
    """A diffusers pipeline folder's ``model_index.json`` (corrupt: :class:`ModelLoadError` naming it)."""
    return read_json_file(folder / "model_index.json", "pipeline index")


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is switched off (``HF_HUB_OFFLINE=1``)."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(getattr(hub_constants, "HF_HUB_OFFLINE", False))


def _looks_like_local_path(name: str) -> bool:
    if name.startswith(("/", "./", "../", "~", ".\\")) or name.endswith(SINGLE_FILE_SUFFIXES):
        return True
    # Hub ids are "name" or "owner/name"; anything with more path parts must be a local path.
    return name.count("/") > 1 or "\\" in name


def load_pipeline(
    pipeline_cls: type[P],
    name_or_path: str | os.PathLike,
    *,
    revision: str = "main",
    single_file_config: str | None = None,
    **kwargs: Any,
) -> P:
    """Load ``pipeline_cls`` from ``name_or_path``.

    Resolution order: an existing file is a single-file checkpoint (CompVis/A1111 layout, through
    diffusers' ``from_single_file``; ``single_file_config`` names the diffusers folder or Hub id whose
    configs describe its architecture, needed offline); an existing folder is a diffusers pipeline folder
    (with ``model_index.json``); anything else shaped like a Hub id is fetched from (or found in the cache
    of) the Hugging Face Hub at ``revision``.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_file():
        return _load_single_file(pipeline_cls, path, single_file_config, **kwargs)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            found = sorted(p.name for p in path.iterdir())[:12]
            raise ModelLoadError(
                f"'{name}' is a folder but not a diffusers pipeline folder: it has no model_index.json "
                f"(it contains: {found}). Tried: local folder. Point to the folder written by "
                f"{pipeline_cls.__name__}.save_pretrained (with unet/, scheduler/, ... and model_index.json), "
                "or to a single-file .safetensors/.ckpt checkpoint."
            )
        read_model_index(path)
        try:
            return pipeline_cls.from_pretrained(str(path), **kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised with the source named
            raise ModelLoadError(f"Could not load the diffusers folder '{name}' as {pipeline_cls.__name__}: {err}") from err
    if _looks_like_local_path(name):
        raise ModelLoadError(
            f"Model path '{name}' does not exist. Tried: local file or folder '{path.resolve()}'. "
            "Check the path, or give a Hugging Face Hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'."
        )
    return _load_from_hub(pipeline_cls, name, revision, **kwargs)


def _load_single_file(pipeline_cls: type[P], path: Path, config: str | None, **kwargs: Any) -> P:
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(
            f"'{path}' is a file but not a checkpoint diffrl can read (suffix '{path.suffix}'); "
            f"expected one of {SINGLE_FILE_SUFFIXES} or a diffusers folder."
        )
    if not hasattr(pipeline_cls, "from_single_file"):
        raise ModelLoadError(
            f"{pipeline_cls.__name__} cannot be loaded from a single file ('{path}'); give a diffusers folder or Hub id."
        )
    if config is not None:
        kwargs["config"] = config
    try:
        return pipeline_cls.from_single_file(str(path), **kwargs)
    except Exception as err:  # noqa: BLE001
        hint = (
            " Offline, diffusers cannot fetch the matching configs: pass single_file_config=<a local diffusers "
            "folder or cached Hub id of the same architecture>."
            if config is None
            else ""
        )
        raise ModelLoadError(
            f"Could not load the single-file checkpoint '{path}' with {pipeline_cls.__name__}.from_single_file "
            f"(tried: single-file loader{' with config ' + repr(config) if config else ''}): {err}.{hint}"
        ) from err


def _load_from_hub(pipeline_cls: type[P], repo_id: str, revision: str, **kwargs: Any) -> P:
    try:
        return pipeline_cls.from_pretrained(repo_id, revision=revision, **kwargs)
    except Exception as err:  # noqa: BLE001
        tried = f"Tried: local path '{Path(repo_id).resolve()}' (does not exist); Hub repo '{repo_id}' at revision '{revision}'"
        if hub_offline():
            raise ModelLoadError(
                f"Model '{repo_id}' is not available offline: HF_HUB_OFFLINE=1 is set and no cached copy was "
                f"found. {tried} (cache only). Download it once with network access "
                f"(`hf download {repo_id}`), or give a local folder or single-file checkpoint."
            ) from err
        raise ModelLoadError(f"Could not load model '{repo_id}'. {tried}. Cause: {err}") from err


def load_vae(source: str | os.PathLike, revision: str = "main") -> AutoencoderKL:
    """An ``AutoencoderKL`` from a folder (itself, or a pipeline folder's ``vae/``), a single file, or a Hub id
    (e.g. the fp16-safe ``madebyollin/sdxl-vae-fp16-fix``)."""
    name = os.fspath(source)
    path = Path(name).expanduser()
    try:
        if path.is_file():
            return AutoencoderKL.from_single_file(str(path))
        if path.is_dir():
            sub = "vae" if (path / "vae" / "config.json").is_file() and not (path / "config.json").is_file() else None
            return AutoencoderKL.from_pretrained(str(path), subfolder=sub)
        return AutoencoderKL.from_pretrained(name, revision=revision)
    except Exception as err:  # noqa: BLE001 - re-raised with the setting named
        raise ModelLoadError(f"vae={name!r} could not be loaded as an AutoencoderKL (tried: a VAE folder or a "
                             f"pipeline folder's vae/, a single file, a Hub id): {err}") from err
