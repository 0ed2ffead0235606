"""Fully sharded data parallel (FSDP2) applied by diffrl itself, from the FSDP settings ``accelerate launch`` sets.

``accelerate launch --config_file configs/accelerate/fsdp.yaml`` writes the config into the environment
(``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ``FSDP_RESHARD_AFTER_FORWARD``, ``FSDP_TRANSFORMER_CLS_TO_WRAP``, ...).
On GPUs accelerate would wrap the model through ``prepare``; on CPU processes it silently falls back to plain
data parallel (``MULTI_CPU``) and shards nothing. So diffrl applies ``torch.distributed.fsdp.fully_shard`` itself,
the same way on both (as torchtune does), and keeps accelerate for launching, processes, RNG and trackers:
the same code path runs in the CPU test suite and on GPUs.

What a sharded run does differently (everything else is the data-parallel path):

- each module of the model's ``_no_split_modules`` classes (or ``FSDP_TRANSFORMER_CLS_TO_WRAP``) is sharded
  apart, then the root; parameters become DTensors sharded on dim 0 over the processes, and the optimizer is
  built over those shards (its state is sharded with them); gradients are reduce-scattered (averaged) in
  backward, so no process holds whole gradients;
- anything that runs the model (sampling, evaluation, the model card's samples) runs on every process, since
  each forward pass gathers the weights collectively;
- weight overrides (GRPO's and NFT's reference, NFT's old policy) are shards of the same layout, swapped into
  place for a forward pass without gradients (:func:`diffrl.pipelines.sharded.swapped_shards`);
- checkpoints and results hold whole tensors gathered to the main process (``FULL_STATE_DICT``: a checkpoint
  resumes on any number of processes); loading gives each process its own slice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch

__all__ = ["FSDPSettings", "ShardingError", "fsdp_compute_dtype", "full_state_dict", "load_optimizer_state",
           "optimizer_state", "shard"]

_TRUE = ("1", "true", "yes")


class ShardingError(ValueError):
    """A sharding setting diffrl cannot honour; the message names it and the fix."""


@dataclass(frozen=True)
class FSDPSettings:
    """The FSDP settings of the launch (``fsdp_config`` of the accelerate config file)."""

    reshard_after_forward: bool = True
    wrap_classes: tuple[str, ...] = ()  # empty: the model's own ``_no_split_modules``
    offload_params: bool = False

    @classmethod
    def requested(cls) -> FSDPSettings | None:
        """The launch's FSDP settings, or ``None`` when it did not ask for FSDP."""
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() not in _TRUE:
            return None
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise ShardingError(f"fsdp_version={version} in the accelerate config: diffrl shards with FSDP2 "
                                "(torch.distributed.fsdp.fully_shard); set fsdp_version: 2 (configs/accelerate/"
                                "fsdp.yaml)")
        if os.environ.get("FSDP_OFFLOAD_PARAMS", "").lower() in _TRUE:
            raise ShardingError("fsdp_offload_params: true is not supported by diffrl's FSDP2 path (not tested); "
                                "set it to false")
        wrap = tuple(c.strip() for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
        reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() in _TRUE
        return cls(reshard_after_forward=reshard, wrap_classes=wrap)


def fsdp_compute_dtype(mixed_precision: Any) -> torch.dtype | None:
    """The dtype FSDP2 computes in for accelerate's ``mixed_precision`` (bf16), ``None`` for full precision;
    fp16 is refused (its loss scaling lives in accelerate's optimizer wrapper, which a sharded run does not use)."""
    value = str(getattr(mixed_precision, "value", mixed_precision) or "no").lower()
    if value == "fp16":
        raise ShardingError("mixed_precision=fp16 with FSDP: diffrl's sharded path has no loss scaling; use "
                            "mixed_precision=bf16")
    return torch.bfloat16 if value == "bf16" else None


def shard(module: torch.nn.Module, settings: FSDPSettings,
          mixed_precision: torch.dtype | None = None) -> list[str]:
    """Apply FSDP2 to ``module`` in place: every submodule of the wrap classes, then the root. Returns the names
    of the submodules sharded apart. ``mixed_precision`` (bf16): compute in it, reduce gradients in float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    classes = set(settings.wrap_classes or getattr(module, "_no_split_modules", None) or ())
    known = {type(m).__name__ for m in module.modules()}
    missing = sorted(c for c in settings.wrap_classes if c not in known)
    if missing:
        raise ShardingError(f"fsdp_transformer_layer_cls_to_wrap names {missing}, which {type(module).__name__} does "
                            f"not contain; its module classes include {sorted(known)[:12]}")
    policy = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32) \
        if mixed_precision is not None else MixedPrecisionPolicy()
    wrapped = []
    for name, sub in module.named_modules():
        if name and type(sub).__name__ in classes:
            fully_shard(sub, reshard_after_forward=settings.reshard_after_forward, mp_policy=policy)
            wrapped.append(name)
    fully_shard(module, reshard_after_forward=settings.reshard_after_forward, mp_policy=policy)
    return wrapped


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights as CPU tensors on the main process (empty elsewhere); every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's whole state (by parameter name) on the main process, empty elsewhere; a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         state: Mapping[str, Any] | None) -> None:
    """Give each process its slice of a whole optimizer state (read on the main process; ``None`` elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, dict(state or {}),
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
