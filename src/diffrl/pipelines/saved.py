"""The small JSON file diffrl writes beside saved weights, so a result can be loaded to continue training."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from huggingface_hub import hf_hub_download

from diffrl._version import __version__
from diffrl.pipelines.loading import read_json_file
from diffrl.pipelines.lora import LoraSettings

MODEL_FILE = "diffrl_model.json"


def write_model_info(directory: str | os.PathLike, *, kind: str, base_model: str | None, revision: str,
                     lora: dict | None, extra: dict[str, Any] | None = None) -> None:
    """Record what was saved: the policy kind, its base model, and the LoRA settings (``None`` for full weights);
    ``extra`` holds kind-specific settings (e.g. SDXL's VAE and size conditioning)."""
    info = {"kind": kind, "base_model": base_model, "revision": revision, "lora": lora, **(extra or {}),
            "diffrl_version": __version__}
    Path(directory, MODEL_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def read_model_info(name_or_path: str | os.PathLike, revision: str = "main") -> dict[str, Any] | None:
    """The saved-model record of a local folder or Hub repo, or ``None`` when there is none."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        file = path / MODEL_FILE
        return read_json_file(file, "diffrl model record") if file.is_file() else None
    if path.exists() or str(name_or_path).count("/") != 1:
        return None
    try:  # a Hub repo pushed by diffrl (continues training from a shared result: TRL issue 2505)
        return json.loads(Path(hf_hub_download(str(name_or_path), MODEL_FILE, revision=revision)).read_text())
    except Exception:  # noqa: BLE001 - not a diffrl repo, or offline: treat as a plain base model
        return None


class LoadPlan(NamedTuple):
    """What ``from_pretrained`` should load: the base model, its revision, and the adapter to put on it."""

    base: str
    revision: str
    use_lora: bool
    lora: LoraSettings | None
    lora_weights: str | os.PathLike | None


def plan_load(name_or_path: str | os.PathLike, revision: str, kind: str, use_lora: bool, lora: LoraSettings | None,
              lora_weights: str | os.PathLike | None) -> LoadPlan:
    """Resolve a diffrl LoRA result (``diffrl_model.json`` with LoRA settings) to its base model plus adapter;
    anything else loads as given. A result of another policy kind is an error naming both kinds."""
    info = read_model_info(name_or_path, revision)
    if info is None or info.get("lora") is None:
        if lora_weights is not None and not use_lora:
            raise ValueError("lora_weights was given with use_lora=False; set use_lora=True to train the adapter.")
        return LoadPlan(os.fspath(name_or_path), revision, use_lora, lora, lora_weights)
    if info.get("kind") != kind:
        raise ValueError(f"'{name_or_path}' holds a diffrl '{info.get('kind')}' model, not a '{kind}' model.")
    saved = info["lora"]
    lora = lora or LoraSettings(rank=saved["rank"], alpha=saved["alpha"], target_modules=tuple(saved["target_modules"]),
                                init=saved.get("init", "gaussian"))
    return LoadPlan(info["base_model"], info.get("revision", "main"), True, lora, name_or_path)
