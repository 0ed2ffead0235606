"""The divergence guard: a run whose loss, gradients, weights or samples stop being finite stops, with the
epoch, the step, the learning rate and the last finite checkpoint to resume from — and nothing non-finite is
ever written as a checkpoint or a result."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import torch

from diffrl import checkpoint as ckpt


class DivergenceError(RuntimeError):
    """Training produced non-finite numbers; the message says where, and how to continue."""


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """One boolean tensor (no host sync): every element of every tensor is finite. FSDP2 shards are checked
    where they live and the verdict is agreed by all processes (a collective), so every process stops together."""
    flags, shards = [], False
    for t in tensors:
        if t is None or not t.is_floating_point():
            continue
        if hasattr(t, "to_local"):
            t, shards = t.to_local(), True
        flags.append(torch.isfinite(t).all())
    verdict = torch.stack(flags).all() if flags else torch.tensor(True)
    if shards:
        agreed = verdict.to(torch.int32)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
        verdict = agreed.bool()
    return verdict


class DivergenceGuard:
    """Checks what a trainer produces, at the points where a check costs one host synchronisation at most."""

    def __init__(self, checkpoints_dir: Path) -> None:
        self.checkpoints_dir = Path(checkpoints_dir)

    def _fail(self, what: str, epoch: int, step: int, lr: float) -> None:
        found = ckpt.list_checkpoints(self.checkpoints_dir)
        resume = (f"resume from the last finite checkpoint with resume_from={found[-1]}" if found
                  else "no checkpoint was written yet, so start again")
        raise DivergenceError(
            f"the policy diverged at epoch {epoch}, optimizer step {step}: {what} (train_learning_rate={lr:g}). "
            f"Lower train_learning_rate or clip gradients (train_max_grad_norm), then {resume}.")

    def check_gradients(self, grad_norm: torch.Tensor, epoch: int, step: int, lr: float) -> None:
        """Before the optimizer step: a non-finite gradient norm would make every weight non-finite."""
        if not bool(torch.isfinite(grad_norm)):
            self._fail(f"the gradient norm is {float(grad_norm)}", epoch, step, lr)

    def check_samples(self, tensors: Mapping[str, torch.Tensor], epoch: int, step: int, lr: float) -> None:
        """After sampling: non-finite images, latents or log-probabilities come from the policy, not the reward."""
        if bool(all_finite(tensors.values())):  # the one host synchronisation
            return
        bad = [name for name, t in tensors.items() if t is not None and not bool(all_finite([t]))]
        if bad:
            self._fail(f"the policy's sampled {', '.join(bad)} are not finite", epoch, step, lr)

    def check_weights(self, params: Iterable[torch.Tensor], epoch: int, step: int, lr: float) -> None:
        """Before anything is saved: the trainable weights must be finite."""
        if not bool(all_finite(p.detach() for p in params)):
            self._fail("the trainable weights are not finite", epoch, step, lr)
