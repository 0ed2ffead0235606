"""Name -> factory tables with checked options: the one home of ``register`` / ``available`` / ``load``.

:mod:`diffrl.rewards` and :mod:`diffrl.prompts` each hold one :class:`Registry`; their ``load(name, **options)``
refuses an unknown name (with a did-you-mean and the known names) and unknown or missing options (with a
did-you-mean and the accepted ones) before the factory runs, so a typo in a config fails before any model loads.

Besides registered names, ``load`` takes a reference to the user's own code, ``"package.module:attribute"``
(the module is imported; ``attribute`` may be dotted), and installed packages add names through the entry-point
group of the registry (``diffrl.rewards``, ``diffrl.prompts``), loaded on first use. What a reference or entry
point names is a factory (called with the options), unless the registry's ``direct`` rule says it is already
the thing itself (a reward function with TRL's signature; a prompt function without parameters).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "is_reference", "positional_parameters", "suggest"]

_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def positional_parameters(target: Callable[..., Any]) -> int | None:
    """How many parameters ``target`` takes positionally without a default (None when it has no signature)."""
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    return sum(1 for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               and p.default is inspect.Parameter.empty)


def is_reference(name: object) -> bool:
    """Whether ``name`` has the form ``package.module:attribute`` (a reference to code, not a registered name)."""
    return isinstance(name, str) and bool(_REFERENCE.match(name))

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
                 factories: Mapping[str, Callable[..., T]] | None = None, *, entry_points: str | None = None,
                 direct: Callable[[Any], bool] | None = None) -> None:
        self.kind, self.known, self.error = kind, known, error
        self.entry_points, self.direct = entry_points, direct
        self.factories: dict[str, Callable[..., T]] = {}
        for name, factory in (factories or {}).items():
            self.register(name, factory)
        self._plugins_loaded = entry_points is None

    def _load_plugins(self) -> None:
        """Register the entry points of installed packages once (a built-in name keeps its built-in factory)."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for point in importlib.metadata.entry_points(group=self.entry_points):
            if point.name in self.factories:
                continue
            self.factories[point.name] = functools.partial(self._entry_point_factory, point)

    def _entry_point_factory(self, point: importlib.metadata.EntryPoint, **options: Any) -> T:
        try:
            target = point.load()
        except Exception as err:  # noqa: BLE001 - a broken plugin is the user's to fix, named here
            raise self.error(f"{self.kind} '{point.name}' (entry point {point.value} of group {self.entry_points}) "
                             f"failed to import: {type(err).__name__}: {err}") from err
        return self._build(point.name, target, options)

    def available(self) -> list[str]:
        """The registered names (with installed packages' entry points), sorted."""
        self._load_plugins()
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
        """Build what ``name`` names with ``options``, checked against the factory's signature first: a registered
        name, an installed entry point, or a ``module:attribute`` reference."""
        if is_reference(name):
            return self._build(name, self.resolve(name), options)
        self._load_plugins()
        if name not in self.factories:
            how = "; or give your own as package.module:function" if ":" not in str(name) else ""
            raise self.error(f"unknown {self.kind} {name!r}{_hint(name, self.factories)}; "
                             f"{self.known}: {', '.join(self.available())}{how}")
        factory = self.factories[name]
        if isinstance(factory, functools.partial) and factory.func == self._entry_point_factory:
            return factory(**options)
        self.check_options(name, factory, options)
        return factory(**options)

    def takes_option(self, name: str, option: str) -> bool:
        """Whether the factory that ``name`` names (registered, entry point, or reference) has a keyword ``option``
        (False for what is used directly, and for what cannot be found: ``load`` reports that)."""
        try:
            target = self.resolve(name) if is_reference(name) else self.factories.get(name)
        except Exception:  # noqa: BLE001 - load() raises the proper error for the same name
            return False
        if target is None or (self.direct is not None and self.direct(target)):
            return False
        try:
            return option in inspect.signature(target).parameters
        except (TypeError, ValueError):
            return False

    def resolve(self, reference: str) -> Callable[..., Any]:
        """The object a ``module:attribute`` reference names; a missing module or attribute, or something that is
        not callable, is an error naming the reference (with a did-you-mean for the attribute)."""
        module_name, _, attribute = reference.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            where = "" if err.name == module_name else f" (it imports {err.name!r}, which is not installed)"
            raise self.error(f"{self.kind} {reference!r}: module {module_name!r} cannot be imported{where}; check the "
                             "name, and that its folder is on PYTHONPATH or the package is installed") from err
        target: Any = module
        for part in attribute.split("."):
            if not hasattr(target, part):
                public = [n for n in dir(target) if not n.startswith("_")]
                raise self.error(f"{self.kind} {reference!r}: {module_name} has no attribute {part!r}"
                                 f"{_hint(part, public)}")
            target = getattr(target, part)
        if not callable(target):
            raise self.error(f"{self.kind} {reference!r} is a {type(target).__name__}, not a function or class")
        return target

    def _build(self, name: str, target: Callable[..., Any], options: Mapping[str, Any]) -> T:
        """``target`` itself when the registry's ``direct`` rule says it is the finished thing (options then bind
        as keyword arguments of its calls), else ``target(**options)``."""
        if self.direct is not None and self.direct(target):
            if options:
                self.check_options(name, target, options, required=False)
                return functools.partial(target, **options)  # type: ignore[return-value]
            return target
        self.check_options(name, target, options)
        return target(**options)

    def check_options(self, name: str, factory: Callable[..., T], options: Mapping[str, Any], *,
                      required: bool = True) -> None:
        """Raise unless ``factory`` accepts every option and (``required``) gets every option it requires."""
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
        if missing and required:
            raise self.error(f"{self.kind} '{name}' needs option(s) {', '.join(missing)}")
