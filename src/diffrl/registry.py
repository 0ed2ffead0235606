"""Name -> factory tables with checked options: the one home of ``register`` / ``available`` / ``load``.

:mod:`diffrl.rewards` and :mod:`diffrl.prompts` each hold one :class:`Registry`; their ``load(name, **options)``
refuses an unknown name (with a did-you-mean and the known names) and unknown or missing options (with a
did-you-mean and the accepted ones) before the factory runs, so a typo in a config fails before any model loads.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "suggest"]

T = TypeVar("T")


def suggest(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to ``name`` (difflib's ratio >= 0.6), or None when nothing is close."""
    matches = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _hint(name: str, known: Iterable[str]) -> str:
    close = suggest(name, known)
    return f" (did you mean '{close}'?)" if close else ""


class Registry(Generic[T]):
    """Factories by name. ``kind`` names what they build in messages ("reward", "prompt source"), ``known`` titles
    the list of names ("known rewards"), and ``error`` is the exception raised for every mistake."""

    def __init__(self, kind: str, known: str, error: type[Exception],
                 factories: Mapping[str, Callable[..., T]] | None = None) -> None:
        self.kind, self.known, self.error = kind, known, error
        self.factories: dict[str, Callable[..., T]] = {}
        for name, factory in (factories or {}).items():
            self.register(name, factory)

    def available(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self.factories)

    def register(self, name: str, factory: Callable[..., T], *, overwrite: bool = False) -> None:
        """Make ``load(name, **options)`` call ``factory(**options)`` (a class works); a taken name needs
        ``overwrite=True``."""
        if not isinstance(name, str) or not name:
            raise self.error(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if not callable(factory):
            raise self.error(f"the factory for {self.kind} '{name}' must be callable, got {factory!r}")
        if name in self.factories and not overwrite:
            raise self.error(f"{self.kind} '{name}' is already registered; pass overwrite=True to replace it")
        self.factories[name] = factory

    def load(self, name: str, **options: Any) -> T:
        """Build what is registered as ``name`` with ``options``, checked against the factory's signature first."""
        if name not in self.factories:
            raise self.error(f"unknown {self.kind} {name!r}{_hint(name, self.factories)}; "
                             f"{self.known}: {', '.join(self.available())}")
        factory = self.factories[name]
        self.check_options(name, factory, options)
        return factory(**options)

    def check_options(self, name: str, factory: Callable[..., T], options: Mapping[str, Any]) -> None:
        """Raise unless ``factory`` accepts every option and gets every option it requires."""
        try:
            parameters = inspect.signature(factory).parameters
        except (TypeError, ValueError):  # builtins without a signature: let the call report
            return
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return
        accepted = [n for n, p in parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for option in options:
            if option not in accepted:
                raise self.error(f"{self.kind} '{name}' has no option '{option}'{_hint(option, accepted)}; "
                                 f"its options are: {', '.join(accepted) or 'none'}")
        missing = [n for n in accepted if parameters[n].default is inspect.Parameter.empty and n not in options]
        if missing:
            raise self.error(f"{self.kind} '{name}' needs option(s) {', '.join(missing)}")
