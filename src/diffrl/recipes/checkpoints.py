"""Training checkpoints through ``accelerator.save_state`` / ``load_state``, inside diffrl's atomic commit.

A checkpoint folder ``checkpoint_<epoch>/`` holds what accelerate writes (``optimizer.bin`` or its sharded
FSDP/DeepSpeed equivalent, ``scaler.pt`` under fp16, ``random_states_<rank>.pkl`` per process: the one record of
the random generators, and ``custom_checkpoint_0.pkl``, the learning-rate schedule registered with
``register_for_checkpointing``), plus diffrl's own files: ``trainable.safetensors`` (only the trained weights,
LoRA adapters or the whole network, gathered to full tensors under sharding; ``diffrl evaluate`` reads it), any
recipe extras (``Recipe.save_files``) and last the marker ``diffrl_state.json``: the one record of the trainer's
state (:meth:`Trainer.checkpoint_state`), written when the folder commits. Every process writes into the same
hidden folder; only the main process commits it.

Checkpoints written before (with ``rng_<rank>.pt`` beside accelerate's random states, and the trainer state also
pickled as ``custom_checkpoint_1.pkl``) resume as they are; so does the layout before accelerate's ``save_state``
(``optimizer.pt``, ``lr_scheduler.pt``): :func:`load_legacy_checkpoint` reads it directly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list, gather_object
from safetensors.torch import load_file, save_file

from diffrl import checkpoint as ckpt
from diffrl.pipelines.sharded import is_fully_sharded
from diffrl.pipelines.types import DiffusionPolicy
from diffrl.recipes import sharding
from diffrl.run_folder import OPTIMIZER_FILE, SCHEDULER_FILE, TRAINABLE_FILE

SHARDED = (DistributedType.DEEPSPEED,)
"""Where accelerate itself shards (DeepSpeed). FSDP is diffrl's own (:mod:`diffrl.recipes.sharding`), recognised by
the trained module (:func:`diffrl.pipelines.sharded.is_fully_sharded`) whatever accelerate's distributed type."""
FSDP_OPTIMIZER_FILE = "optimizer_full.pt"
"""A sharded (FSDP) run's optimizer state, gathered whole on the main process (resumes on any process count)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); nothing earlier was touched."""


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether accelerate splits parameters or optimizer state over processes (DeepSpeed)."""
    return accelerator.distributed_type in SHARDED


def full_trainable_state_dict(accelerator: Accelerator, policy: DiffusionPolicy,
                              prepared: torch.nn.Module | None = None) -> dict[str, torch.Tensor] | None:
    """The trained weights as whole CPU tensors by their UNet names; every process must call it.

    Unsharded: :meth:`policy.trainable_state_dict` (each process holds them all). FSDP2 (diffrl's) or DeepSpeed
    (accelerate's ``get_state_dict`` of the prepared module): the full state dict is gathered (a collective: every
    process takes part) and the trained names are kept (``None`` on processes other than the main one)."""
    module = policy.trainable_module
    fsdp = is_fully_sharded(module)
    if not fsdp and (not is_sharded(accelerator) or prepared is None):
        return policy.trainable_state_dict()
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    full = sharding.full_state_dict(module) if fsdp else accelerator.get_state_dict(prepared)
    if not accelerator.is_main_process:
        return None
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in full.items() if k in names}


@contextlib.contextmanager
def whole_parameters(module: torch.nn.Module, full: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Within the context, ``module``'s parameters named in ``full`` are plain tensors holding ``full``'s values
    (the originals, e.g. FSDP2's sharded DTensors, are put back afterwards, forward passes in between are not
    allowed), and an FSDP2-wrapped module shows its own class (FSDP2 renames it ``FSDP<Class>``, which would go
    into a saved ``config.json``). ``full=None`` (a process that received nothing): no change."""
    if not full:
        yield
        return
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    cls = type(module)
    original = next((b for b in cls.__bases__ if b.__name__ != "FSDPModule"), cls) \
        if any(b.__name__ == "FSDPModule" for b in cls.__bases__) else cls
    try:
        for name, value in full.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if leaf not in owner._parameters:
                continue
            swapped.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
        module.__class__ = original
        yield
    finally:
        module.__class__ = cls
        for owner, leaf, param in reversed(swapped):
            owner._parameters[leaf] = param


@contextlib.contextmanager
def _explicit_folders(accelerator: Accelerator) -> Iterator[None]:
    """``save_state``/``load_state`` into the folder given, even when TRL-style ``project_kwargs`` turned on
    accelerate's ``automatic_checkpoint_naming`` (which would ignore it and keep its own rotation)."""
    project = accelerator.project_configuration
    automatic = project.automatic_checkpoint_naming
    project.automatic_checkpoint_naming = False
    try:
        yield
    finally:
        project.automatic_checkpoint_naming = automatic


class CheckpointIO:
    """Registers diffrl's hooks and objects with ``accelerator`` and writes/reads checkpoints through it.

    ``prepared`` is what ``accelerator.prepare`` returned for the trained module, or ``None`` when it was not
    prepared (AlignProp under DDP keeps its UNet unwrapped): its whole state dict is then neither saved nor
    loaded by accelerate; the trained weights go to ``trainable.safetensors`` in either case."""

    def __init__(self, accelerator: Accelerator, policy: DiffusionPolicy, lr_scheduler,
                 prepared: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.accelerator, self.policy, self.lr_scheduler, self.prepared = accelerator, policy, lr_scheduler, prepared
        self.optimizer = optimizer  # saved here only under FSDP2 (accelerate saves the optimizers it prepared)
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)
        accelerator.register_for_checkpointing(lr_scheduler)

    def _ours(self, models: list) -> list[int]:
        module = self.policy.trainable_module
        return [i for i, m in enumerate(models) if self.accelerator.unwrap_model(m) is module]

    def _save_hook(self, models: list, weights: list, output_dir: str) -> None:
        """Instead of the whole UNet (``model.safetensors``), only the trained weights (LoRA: the adapters)."""
        if not is_sharded(self.accelerator):  # sharded: accelerate saved the model its own way; weights is empty
            for i in reversed(self._ours(models)):
                weights.pop(i)
        state = full_trainable_state_dict(self.accelerator, self.policy, self.prepared)
        module = self.policy.trainable_module
        optimizer = sharding.optimizer_state(module, self.optimizer) if is_fully_sharded(module) else None
        if self.accelerator.is_main_process:
            save_file(state, Path(output_dir) / TRAINABLE_FILE)
            if optimizer is not None:
                torch.save(optimizer, Path(output_dir) / FSDP_OPTIMIZER_FILE)

    def _load_hook(self, models: list, input_dir: str) -> None:
        for i in reversed(self._ours(models)):
            models.pop(i)
        if not is_sharded(self.accelerator):  # sharded: accelerate loaded the model (and its shards) itself
            load_trainable_weights(self.policy, Path(input_dir))

    # ------------------------------------------------------------------ saving
    def save(self, checkpoints_dir: Path, epoch: int, keep: int, state: dict[str, Any],
             extra_files: Callable[[Path], None] | None = None) -> Path:
        """Every process takes part (no process waits on a save the others skip: TRL's multi-GPU hang).

        All processes ``save_state`` into one hidden folder (named after the main process's id; accelerate writes
        each process's random states), ``extra_files(tmp)`` runs on every process; after all succeeded the main
        process writes the marker (``state``, the trainer's), renames the folder into place and drops old
        checkpoints (never the one just written). A failure on any process removes the folder and raises
        :class:`CheckpointWriteError` on every process."""
        acc = self.accelerator
        tag = [os.getpid()]
        if acc.num_processes > 1:
            broadcast_object_list(tag, from_process=0)
        target = checkpoints_dir / ckpt.checkpoint_name(epoch)
        tmp = ckpt.temp_dir_for(target, tag[0])
        if acc.is_main_process:
            checkpoints_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a crashed save of ours
                shutil.rmtree(tmp)
            tmp.mkdir()
        acc.wait_for_everyone()
        error = None
        try:
            with _explicit_folders(acc):
                acc.save_state(str(tmp))
            if extra_files is not None:
                extra_files(tmp)
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
            error = f"{type(err).__name__}: {str(err).strip()[:200]}"
        errors = gather_object([error]) if acc.num_processes > 1 else [error]
        failed = next((e for e in errors if e is not None), None)
        if acc.is_main_process:
            if failed is None:
                try:
                    ckpt.commit(tmp, target, {"epoch": epoch, **state})
                except OSError as err:
                    failed = f"{type(err).__name__}: {str(err).strip()[:200]}"
            if failed is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                ckpt.rotate(checkpoints_dir, keep)
        if acc.num_processes > 1:
            failed = gather_object([failed])[0]
        acc.wait_for_everyone()
        if failed is not None:
            found = ckpt.list_checkpoints(checkpoints_dir)
            kept = f"the newest complete checkpoint, {found[-1]}, is intact" if found else "no earlier checkpoint"
            raise CheckpointWriteError(f"could not write checkpoint {target} ({failed}); {kept}. Free disk space or "
                                       f"fix the folder's permissions, then resume with "
                                       f"resume_from={checkpoints_dir.parent}")
        return target

    # ------------------------------------------------------------------ loading
    def load(self, path: Path, optimizer) -> dict[str, Any]:
        """Restore a checkpoint of either layout; returns the saved trainer state (with ``epoch``)."""
        path = Path(path)
        if (path / OPTIMIZER_FILE).is_file():
            return load_legacy_checkpoint(self.accelerator, path, self.policy, optimizer, self.lr_scheduler)
        state = ckpt.read_state(path)
        with _explicit_folders(self.accelerator):
            self.accelerator.load_state(str(path))
        module = self.policy.trainable_module
        if is_fully_sharded(module):  # the main process reads the whole state; each process keeps its slice
            file = path / FSDP_OPTIMIZER_FILE
            whole = torch.load(file, map_location="cpu", weights_only=True) \
                if self.accelerator.is_main_process else None
            sharding.load_optimizer_state(module, optimizer, whole)
        rng_file = path / f"rng_{self.accelerator.process_index}.pt"
        if rng_file.is_file():  # a checkpoint written before accelerate's random states were the only record
            ckpt.load_rng_state(torch.load(rng_file, weights_only=True))
        return state


def load_trainable_weights(policy: DiffusionPolicy, path: Path) -> None:
    """Copy a checkpoint's trainable weights into ``policy`` (built with the run's model and LoRA settings)."""
    file = Path(path) / TRAINABLE_FILE
    policy.load_trainable_state_dict(load_file(file), source=str(file))


def load_legacy_checkpoint(accelerator: Accelerator, path: Path, policy: DiffusionPolicy, optimizer,
                           lr_scheduler) -> dict[str, Any]:
    """Restore a checkpoint of the layout before accelerate's ``save_state`` (``optimizer.pt``,
    ``lr_scheduler.pt``, ``rng_<rank>.pt``); returns the saved trainer state (with ``epoch``)."""
    if is_sharded(accelerator):
        raise ValueError(f"{path} was written before diffrl saved through accelerate (optimizer.pt); it cannot be "
                         "resumed under FSDP/DeepSpeed. Resume it without sharding (plain DDP) once, then switch.")
    state = ckpt.read_state(path)
    load_trainable_weights(policy, path)
    optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
    rng_file = path / f"rng_{accelerator.process_index}.pt"
    if rng_file.is_file():
        ckpt.load_rng_state(torch.load(rng_file, weights_only=True))
    return state.get("state", state)
