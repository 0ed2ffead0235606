"""Which denoising steps are stochastic and trained: the SDE window of MixGRPO and Flow-GRPO-Fast.

Only the ``size`` consecutive steps inside the window are sampled with ``eta > 0`` and carry
log-probabilities; the others are deterministic (``eta = 0``) and are never trained (MixGRPO, Li et al. 2025,
"mixed ODE-SDE sampling"; Tencent-Hunyuan/MixGRPO ``fastvideo/utils/grpo_states.py``). Steps are counted in
sampling order, ``0`` (the noisiest) to ``num_steps - 1``, as in :mod:`diffrl.algorithms.truncation`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from diffrl.algorithms.truncation import uniform_int

WindowSchedule = Literal["fixed", "sliding", "random"]
WINDOW_SCHEDULES: tuple[str, ...] = ("fixed", "sliding", "random")

__all__ = ["WINDOW_SCHEDULES", "sde_window", "window_start"]


def window_start(
    num_steps: int,
    size: int,
    *,
    schedule: WindowSchedule,
    epoch: int,
    start: int = 0,
    shift_every: int = 1,
    generator: torch.Generator | None = None,
) -> int:
    """The first step of this epoch's window; the window is ``[s, s + size)``.

    With ``P = num_steps - size + 1`` possible positions:

    * ``fixed``: ``s = start``.
    * ``sliding``: ``s = (start + epoch // shift_every) % P`` -- the window advances by one step every
      ``shift_every`` epochs and, once its last step would pass the end of the chain, wraps to step 0
      (so it never straddles the end). MixGRPO's progressive schedule (``iters_per_group``) advances the
      same way but rolls back to its initial start instead of to 0; with ``start = 0`` the two agree.
    * ``random``: ``s`` uniform on ``[0, P - 1]``, drawn from ``generator`` (MixGRPO's ``random`` strategy).
      The generator is required, so that every process, given the same seed, trains the same steps.
    """
    if schedule not in WINDOW_SCHEDULES:
        raise ValueError(f"sde_window_schedule={schedule!r} is not supported; use one of {list(WINDOW_SCHEDULES)}.")
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1.")
    if not 1 <= size <= num_steps:
        raise ValueError(
            f"sde_window_size={size} must be in [1, num_steps={num_steps}]: the window is a run of sampling steps."
        )
    if epoch < 0:
        raise ValueError(f"epoch={epoch} must be >= 0.")
    positions = num_steps - size + 1
    if schedule == "random":
        if generator is None:
            raise ValueError("the random SDE-window schedule needs a torch.Generator (pass generator=...).")
        return uniform_int(0, positions - 1, generator)
    if not 0 <= start < positions:
        raise ValueError(
            f"sde_window_start={start} must be in [0, {positions - 1}] so that a window of {size} steps fits "
            f"in {num_steps} steps."
        )
    if schedule == "fixed":
        return start
    if shift_every < 1:
        raise ValueError(f"sde_window_shift_every={shift_every} must be >= 1.")
    return (start + epoch // shift_every) % positions


def sde_window(num_steps: int, size: int, **placement: Any) -> list[bool]:
    """``[s <= i < s + size for i in range(num_steps)]`` with ``s = window_start(num_steps, size, **placement)``
    (``placement``: its keyword-only ``schedule``, ``epoch``, ``start``, ``shift_every`` and ``generator``).

    Exactly ``size`` consecutive entries are ``True``: the steps sampled with ``eta > 0`` and trained.
    """
    s = window_start(num_steps, size, **placement)
    return [s <= i < s + size for i in range(num_steps)]
