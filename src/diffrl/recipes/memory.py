"""How many timesteps one fused DDPO training call may take: measured on the first call, fitted to free memory.

On CUDA the allocator's peak during the call says what it took. The CPU has no such counter, so there the call's
saved activations are counted instead (every tensor autograd keeps for the backward pass, through
``torch.autograd.graph.saved_tensors_hooks``; weights excluded): what grows with the rows of a call, and what
running all of a micro-batch's timesteps at once would multiply.
"""

from __future__ import annotations

from typing import Protocol

import psutil
import torch


def fit_timestep_chunk(per_timestep_bytes: int, free_bytes: int, num_timesteps: int, fraction: float = 0.5) -> int:
    """How many timesteps of a micro-batch one training call may take: as many as fit in ``fraction`` of the free
    memory when one timestep takes ``per_timestep_bytes``, between 1 and ``num_timesteps``."""
    if per_timestep_bytes <= 0:
        return num_timesteps
    return max(1, min(num_timesteps, int(fraction * free_bytes // per_timestep_bytes)))


class ChunkProbe(Protocol):
    """A context manager around one training call of one timestep; ``fit`` then gives the chunk."""

    def __enter__(self) -> "ChunkProbe": ...

    def __exit__(self, *exc) -> None: ...

    def fit(self, num_timesteps: int) -> int: ...


class CudaMemoryProbe:
    """One CUDA training call: the allocator's peak during it above what was allocated before (an upper bound
    when an earlier peak was higher; the peak counter is not reset, the epoch's memory metric reads it)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.before = 0

    def __enter__(self) -> "CudaMemoryProbe":
        self.before = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        return None

    def fit(self, num_timesteps: int) -> int:
        used = torch.cuda.max_memory_allocated(self.device) - self.before
        free, _ = torch.cuda.mem_get_info(self.device)
        reusable = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return fit_timestep_chunk(used, free + reusable, num_timesteps)


class SavedTensorProbe:
    """One training call on the CPU: the bytes of the distinct storages autograd saves for the backward pass,
    the module's own weights excluded, against the system's available memory (``psutil``)."""

    def __init__(self, module: torch.nn.Module) -> None:
        local = (p.to_local() if hasattr(p, "to_local") else p for p in module.parameters())  # FSDP2: own shards
        self.weights = {t.untyped_storage().data_ptr() for t in local}
        self.seen: set[int] = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.weights and key not in self.seen:
            self.seen.add(key)
            self.bytes += storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedTensorProbe":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def fit(self, num_timesteps: int) -> int:
        return fit_timestep_chunk(self.bytes, psutil.virtual_memory().available, num_timesteps)


def probe_for(device: torch.device, module: torch.nn.Module) -> ChunkProbe:
    """The probe for ``device``: the allocator on CUDA, saved activations elsewhere."""
    return CudaMemoryProbe(device) if device.type == "cuda" else SavedTensorProbe(module)
