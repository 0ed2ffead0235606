"""What a policy does differently when its trained module is sharded with FSDP2 (:mod:`diffrl.recipes.sharding`
shards it): recognise it, load whole weights into its shards, and run a forward pass under other weights.

Pure tensor bookkeeping on DTensors; no process group is created here.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch

__all__ = ["is_fully_sharded", "local_slice", "swapped_shards"]


def is_fully_sharded(module: torch.nn.Module | None) -> bool:
    """Whether ``module`` was sharded by FSDP2 (its class became ``FSDP<Class>``)."""
    if module is None:
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def local_slice(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """This process's part of the whole tensor ``value`` for the sharded parameter ``target`` (no communication:
    every process holds ``value``)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(target, DTensor):
        return value
    return distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements,
                             src_data_rank=None).to_local()


@contextlib.contextmanager
def swapped_shards(module: torch.nn.Module, params: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the context, ``module``'s parameters named in ``params`` (shards of the same layout, e.g. a
    reference snapshot) hold ``params``' values: every module is resharded, the shards are copied into place, and
    put back on exit. Only for forward passes without gradients (a gradient through ``params`` is not kept)."""
    if torch.is_grad_enabled():
        raise RuntimeError("weight overrides of a sharded model run without gradients (wrap the call in "
                           "torch.no_grad()): the override is copied into the shards, not traced")
    _reshard_all(module)
    own = dict(module.named_parameters())
    saved = {}
    try:
        for name, value in params.items():
            local = own[name].to_local() if hasattr(own[name], "to_local") else own[name]
            saved[name] = local.clone()
            local.copy_(value.to_local() if hasattr(value, "to_local") else local_slice(own[name], value))
        yield
    finally:
        _reshard_all(module)
        own = dict(module.named_parameters())
        for name, value in saved.items():
            local = own[name].to_local() if hasattr(own[name], "to_local") else own[name]
            local.copy_(value)


def _reshard_all(module: torch.nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()
