"""The two error types of the config: one broken rule, and the error that carries all of them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from diffrl.config.secrets import redact

__all__ = ["ConfigError", "Violation"]


class Violation(NamedTuple):
    """One broken rule: the field, its value, what is wrong and how to fix it."""

    field: str
    value: Any
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.field}={redact(self.value, self.field)!r}: {self.problem}. Fix: {self.fix}"


class ConfigError(ValueError):
    """Raised with *every* violation found, not just the first; ``.violations`` lists them."""

    def __init__(self, violations: Iterable[Violation], where: str = "config") -> None:
        self.violations = list(violations)
        self.where = where
        count = len(self.violations)
        lines = "\n".join(f"  - {v}" for v in self.violations)
        super().__init__(f"{where}: {count} problem{'s' if count != 1 else ''}:\n{lines}")

    def __reduce__(self) -> tuple:  # pickle (e.g. across processes) with the violations, not the text
        return type(self), (self.violations, self.where)
