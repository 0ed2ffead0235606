"""Learning-rate schedules by diffusers' names (``diffusers.optimization.get_scheduler``), plus
ddpo-celebahq's ``warmup_cosine`` (a warmup that starts above zero)."""

from __future__ import annotations

from typing import Literal, NamedTuple

__all__ = ["DIFFUSERS_SCHEDULES", "LRSchedule", "ScheduleName"]

ScheduleName = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                       "polynomial", "warmup_cosine"]
DIFFUSERS_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                       "polynomial")
"""The names ``diffusers.optimization.get_scheduler`` takes (its ``SchedulerType``, less ``piecewise_constant``,
which needs a rule string diffrl has no field for)."""
WARMUP_SCHEDULES = frozenset(DIFFUSERS_SCHEDULES) - {"constant"} | {"warmup_cosine"}


class LRSchedule(NamedTuple):
    """Everything needed to build the scheduler for a run of ``total_steps`` optimizer steps.

    For a diffusers name: ``get_scheduler(name, optimizer, num_warmup_steps=warmup_steps,
    num_training_steps=total_steps, num_cycles=num_cycles, power=power)``. For
    ``warmup_cosine``: linear warmup from ``initial_factor * lr`` to ``lr`` over ``warmup_steps``,
    then cosine decay to 0 at ``total_steps`` (ddpo-celebahq; diffusers' ``cosine`` is the case
    ``initial_factor=0``).
    """

    name: str
    warmup_steps: int
    total_steps: int
    initial_factor: float
    num_cycles: int
    power: float

    @property
    def diffusers(self) -> bool:
        """Whether ``diffusers.optimization.get_scheduler`` builds it."""
        return self.name in DIFFUSERS_SCHEDULES
