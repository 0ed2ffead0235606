"""Resuming with changed settings: which differences can be applied mid-run, which are refused, and why.

:func:`diff_for_resume` is pure: it compares the run's recorded config with the new one and
classifies every differing field. The recipe refuses the run when ``diff.refused`` is not
empty (``diff.raise_if_refused()``), applies ``diff.applied`` for real (a new learning rate
must reach the optimizer's param groups) and records the new config beside the old one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from diffrl.config._base import APPLY, resume_rule
from diffrl.config._errors import ConfigError, Violation
from diffrl.config.secrets import REDACTED

__all__ = ["ResumeChange", "ResumeDiff", "diff_for_resume"]

SHAPES = "it changes the shapes of what the checkpoint holds or of an epoch, so the run could not continue exactly"
MODEL = "the checkpoint's weights belong to the run's model and trainable modules"
RNG = "the restored random state continues the run's own seed; a new seed would not reproduce either run"
OBJECTIVE = "the run's rewards, advantages and checkpoints would mix two objectives"
SCHEDULE = "the restored scheduler state (its step count and shape) belongs to the run's schedule"
OPTIMIZER = "the restored optimizer state belongs to the run's optimizer"
VAE = "the run's samples, and so its rewards, were decoded by the run's VAE"
MODEL_OPTIONS = "the network was trained under the run's model options (e.g. SDXL's size conditioning)"
PRECISION = "the gradient scaler and the weights' dtype belong to the run's precision"
RUN_FOLDER = "the run folder holds the checkpoints being resumed"
"""Why a field cannot change mid-run: the ``resume=`` of its :func:`~diffrl.config._base.option`."""

_NOT_COMPARED = frozenset({"resume_from"})


class ResumeChange(NamedTuple):
    """One field that differs between the checkpoint's run and the resumed one."""

    field: str
    old: Any
    new: Any
    applied: bool
    reason: str
    """Why it is refused ("" when applied)."""


class ResumeDiff(NamedTuple):
    """Every difference, split into what the recipe applies and what it must refuse."""

    applied: list[ResumeChange]
    refused: list[ResumeChange]

    def raise_if_refused(self, checkpoint: str = "the checkpoint") -> None:
        """A :class:`ConfigError` naming each refused field, its two values and the way out."""
        if self.refused:
            raise ConfigError([Violation(c.field, c.new, f"differs from {checkpoint}'s run ({c.old!r}); it cannot "
                                         f"change mid-run: {c.reason}",
                                         f"keep {c.field}={c.old!r} to resume, or start a new run without resume_from")
                               for c in self.refused], "resume")


def diff_for_resume(recorded: Any, new: Any) -> ResumeDiff:
    """Compare the run's config (``recorded``, e.g. read back from its ``config.yaml``) with ``new``.

    A different config class (another trainer) is refused as ``trainer``. Values the record
    holds redacted (``***``) are not compared. Each field's rule is stated beside it (``resume=`` of
    its :func:`~diffrl.config._base.option`); a field without one is refused, since nothing says
    it is safe.
    """
    if type(recorded) is not type(new):
        change = ResumeChange("trainer", type(recorded).__name__, type(new).__name__, False,
                              "the checkpoint holds another trainer's state")
        return ResumeDiff([], [change])
    applied, refused = [], []
    for f in dataclasses.fields(new):
        old, value = getattr(recorded, f.name), getattr(new, f.name)
        if f.name in _NOT_COMPARED or old == value or old == REDACTED:
            continue
        if isinstance(old, dict) and isinstance(value, dict) and REDACTED in old.values():
            if {k: v for k, v in old.items() if v != REDACTED} == {k: v for k, v in value.items() if old.get(k)
                                                                      != REDACTED}:
                continue
        rule = resume_rule(type(new), f.name)
        if rule == APPLY:
            applied.append(ResumeChange(f.name, old, value, True, ""))
        else:
            refused.append(ResumeChange(f.name, old, value, False, rule))
    return ResumeDiff(applied, refused)
