"""The helpers that ``_check`` methods state their rules with."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from diffrl.config._base import ConfigBase, Violation
from diffrl.config._types import suggest

__all__ = ["Checks"]


class Checks:
    """Collects violations; each helper skips fields whose type is already wrong."""

    def __init__(self, config: ConfigBase) -> None:
        self.config = config
        self.violations: list[Violation] = []
        self.bad: set[str] = set()

    def ok(self, *names: str) -> bool:
        """Whether all named fields have usable values (right type, finite numbers)."""
        return not any(n in self.bad for n in names)

    def add(self, name: str, problem: str, fix: str) -> None:
        self.violations.append(Violation(name, getattr(self.config, name), problem, fix))
        self.bad.add(name)

    def at_least(self, name: str, low: float, fix: str | None = None) -> None:
        value = getattr(self.config, name)
        if self.ok(name) and value < low:
            self.add(name, f"must be >= {low}", fix or f"set {name} to {low} or more")

    def positive(self, name: str, fix: str | None = None) -> None:
        value = getattr(self.config, name)
        if self.ok(name) and not value > 0:
            self.add(name, "must be > 0", fix or f"set {name} to a positive value")

    def between(self, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
                fix: str | None = None) -> None:
        value = getattr(self.config, name)
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if self.ok(name) and not (above and below):
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            self.add(name, f"must be in {interval}", fix or f"set {name} inside {interval}")

    def one_of(self, name: str, choices: Iterable[Any], fix: str | None = None) -> None:
        value, choices = getattr(self.config, name), list(choices)
        if self.ok(name) and value not in choices:
            close = suggest(str(value), [str(c) for c in choices if c is not None])
            hint = f" (did you mean {close!r}?)" if close else ""
            self.add(name, f"must be one of {choices}", (fix or f"use one of {choices}") + hint)

    def unchanged_unless(self, active: bool, name: str, why: str) -> None:
        """A diffrl field set away from its default where it has no effect is an error."""
        if self.ok(name) and not active and getattr(self.config, name) != type(self.config)._default(name):
            self.add(name, f"has no effect {why}", f"remove {name}, or enable what it configures")
