"""A trainer's checkpoint: trainable weights, optimizer, schedule, every process's RNG state and the trainer's
own state, written atomically by :mod:`diffrl.checkpoint` and read back for an exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from diffrl import checkpoint as ckpt
from diffrl.pipelines.types import DiffusionPolicy
from diffrl.run_folder import OPTIMIZER_FILE, SCHEDULER_FILE, TRAINABLE_FILE


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); nothing earlier was touched."""


def save_checkpoint(accelerator: Accelerator, checkpoints_dir: Path, epoch: int, keep: int, policy: DiffusionPolicy,
                    optimizer, lr_scheduler, state: dict[str, Any]) -> Path:
    """Every process takes part (no process waits on a save the others skip: TRL's multi-GPU hang).

    Each process's RNG state is gathered; the main process writes weights, optimizer, scheduler, RNGs and
    ``state`` atomically, then drops old checkpoints (never the one just written).
    """
    rng_states = gather_object([ckpt.save_rng_state()]) if accelerator.num_processes > 1 else [ckpt.save_rng_state()]
    target = checkpoints_dir / ckpt.checkpoint_name(epoch)
    if accelerator.is_main_process:
        def write(tmp: Path) -> None:
            save_file(policy.trainable_state_dict(), tmp / TRAINABLE_FILE)
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            torch.save(lr_scheduler.state_dict(), tmp / SCHEDULER_FILE)
            for rank, rng in enumerate(rng_states):
                torch.save(rng, tmp / f"rng_{rank}.pt")

        try:
            ckpt.save_atomically(target, write, state={"epoch": epoch, **state})
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
            found = ckpt.list_checkpoints(checkpoints_dir)
            kept = f"the newest complete checkpoint, {found[-1]}, is intact" if found else "no earlier checkpoint"
            raise CheckpointWriteError(f"could not write checkpoint {target} ({str(err).strip()[:200]}); "
                                       f"{kept}. Free disk space or fix the folder's permissions, then resume "
                                       f"with resume_from={checkpoints_dir.parent}") from err
        ckpt.rotate(checkpoints_dir, keep)
    accelerator.wait_for_everyone()
    return target


def load_trainable_weights(policy: DiffusionPolicy, path: Path) -> None:
    """Copy a checkpoint's trainable weights into ``policy`` (built with the run's model and LoRA settings)."""
    policy.load_trainable_state_dict(load_file(Path(path) / TRAINABLE_FILE))


def load_checkpoint(accelerator: Accelerator, path: Path, policy: DiffusionPolicy, optimizer,
                    lr_scheduler) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the saved trainer state (with ``epoch``)."""
    state = ckpt.read_state(path)
    load_trainable_weights(policy, path)
    optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
    rng_file = path / f"rng_{accelerator.process_index}.pt"
    if rng_file.is_file():
        ckpt.load_rng_state(torch.load(rng_file, weights_only=True))
    return state.get("state", state)
