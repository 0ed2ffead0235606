"""Load a model to sample from: a base model, a full fine-tuned result, or a LoRA result on its base."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

from safetensors.torch import load_file

from diffrl import build
from diffrl import checkpoint as ckpt
from diffrl.config import load_config
from diffrl.evaluate.inputs import EvaluationError
from diffrl.pipelines import LoraSettings
from diffrl.pipelines.auto import load_policy
from diffrl.pipelines.saved import read_model_info
from diffrl.run_folder import TRAINABLE_FILE


class LoadedModel(NamedTuple):
    """A policy ready to sample, and what was loaded: ``info`` has ``source``, ``kind``, ``lora`` and ``base_model``."""

    policy: Any
    info: dict[str, Any]


def resolve_model_path(source: str) -> str:
    """``source``, or ``source/final`` when ``source`` is a training run folder (with ``metrics.jsonl``/``config.yaml``
    but no model files of its own)."""
    path = Path(source).expanduser()
    is_model = (path / "model_index.json").is_file() or (path / "diffrl_model.json").is_file()
    is_run = (path / "config.yaml").is_file() or (path / "metrics.jsonl").is_file()
    if path.is_dir() and not is_model and is_run:
        final = path / "final"
        if not final.is_dir():
            raise EvaluationError(f"'{source}' is a training run folder without final/ (the run has not finished); "
                                  f"point to a model folder such as {path / 'checkpoints'} or {path / 'best'}")
        return str(final)
    return source


def checkpoint_run(source: str) -> Path | None:
    """The run folder of a training checkpoint (``<run>/checkpoints/checkpoint_<epoch>``), or ``None`` when
    ``source`` is not one."""
    path = Path(source).expanduser()
    if not (path.is_dir() and ckpt.is_complete(path) and (path / TRAINABLE_FILE).is_file()):
        return None
    run = path.parent.parent
    if not (run / "config.yaml").is_file():
        raise EvaluationError(f"'{source}' is a training checkpoint, but its run folder '{run}' has no config.yaml "
                              "to read the base model and LoRA settings from; evaluate the run's final/ instead")
    return run


def run_folder_of(source: str) -> Path | None:
    """The training run folder a model came from (the parent of ``final/``/``best/``, or the run of a checkpoint,
    with ``metrics.jsonl``)."""
    path = Path(source).expanduser()
    for candidate in (path, path.parent, path.parent.parent):
        if candidate.is_dir() and (candidate / "metrics.jsonl").is_file():
            return candidate
    return None


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def load_model(source: str, *, revision: str = "main", base: str | None = None, base_revision: str = "main",
               device: str = "cpu", mixed_precision: str = "no", strict_base: bool = True) -> LoadedModel:
    """Load ``source`` for sampling.

    - a diffrl LoRA result (``diffrl_model.json`` with LoRA settings): its recorded base model, or ``base`` (at
      ``base_revision``) when given (e.g. when the recorded base was a path that has moved), then the adapter;
    - anything else (Hub id, diffusers folder, single file, full diffrl result): the model as is, with no adapter.
      With ``strict_base``, ``base`` is an error here (there is no adapter to put on it); without, it is unused
      (``diffrl evaluate`` passes its baseline model, which only LoRA results build on).
    """

    source = resolve_model_path(os.fspath(source))
    common: dict[str, Any] = {"device": device, "mixed_precision": mixed_precision}
    run = checkpoint_run(source)
    if run is not None:
        return _load_checkpoint(source, run, base, base_revision, common)
    info = read_model_info(source, revision)
    lora = (info or {}).get("lora")
    if lora is not None:
        recorded = info.get("base_model")
        base_model = base or recorded
        if not base_model:
            raise EvaluationError(f"the LoRA result '{source}' does not record its base model; give it with --base")
        if base and recorded and not _same_model(base, recorded):
            print(f"note: applying the LoRA result '{source}' (trained on '{recorded}') to --base '{base}'",
                  file=sys.stderr)
        settings = LoraSettings(rank=lora["rank"], alpha=lora["alpha"], target_modules=tuple(lora["target_modules"]),
                                init=lora.get("init", "gaussian"))
        revision_used = base_revision if base else info.get("revision", "main")
        policy = load_policy(base_model, revision=revision_used, use_lora=True, lora=settings, lora_weights=source,
                             **common)
        kind = policy.kind  # "ddpm", "stable_diffusion" or "sdxl"
        return LoadedModel(policy, {"source": source, "kind": kind, "lora": True, "base_model": base_model})
    if base is not None and strict_base:
        raise EvaluationError(f"--base {base!r} was given but '{source}' is not a diffrl LoRA result (it has no "
                              "diffrl_model.json with LoRA settings): it loads on its own, so drop --base")
    policy = load_policy(source, revision=revision, use_lora=False, **common)
    kind = policy.kind  # "ddpm", "stable_diffusion" or "sdxl"
    return LoadedModel(policy, {"source": source, "kind": kind, "lora": False,
                                "base_model": (info or {}).get("base_model")})


def _load_checkpoint(source: str, run: Path, base: str | None, base_revision: str,
                     common: dict[str, Any]) -> LoadedModel:
    """A training checkpoint: the run's base model (or ``base``, when the recorded one has moved) with the run's
    LoRA settings, VAE and SDXL size conditioning (:func:`diffrl.build.build_policy`), then the checkpoint's
    trainable weights. ``info`` records the run's ``sample_height``/``sample_width``."""
    config = load_config(run / "config.yaml", recorded=True)
    recorded = build.base_model(config)
    base_model = base or recorded
    if base and not _same_model(base, recorded):
        print(f"note: loading the checkpoint '{source}' (trained on '{recorded}') onto --base '{base}'",
              file=sys.stderr)
    rebuilt = dataclasses.replace(config, model=base_model, model_revision=base_revision if base else
                                  config.model_revision, gradient_checkpointing=False)
    policy = build.build_policy(rebuilt, **common)
    policy.load_trainable_state_dict(load_file(Path(source) / TRAINABLE_FILE))
    kind = policy.kind  # "ddpm", "stable_diffusion" or "sdxl"
    epoch = ckpt.read_state(source).get("epoch")
    return LoadedModel(policy, {"source": source, "kind": kind, "lora": build.uses_lora(config),
                                "base_model": base_model, "checkpoint_epoch": epoch,
                                "sample_height": config.sample_height, "sample_width": config.sample_width})
