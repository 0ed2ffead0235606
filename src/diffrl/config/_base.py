"""The machinery every config class shares: strict loading, overrides, dumping, validation.

Generic: it knows dataclass fields and their types, nothing about trainers or algorithms.
A config class is a plain dataclass that derives from :class:`ConfigBase`; its fields
carry their ``--help`` text in ``metadata["help"]`` (see :func:`option`). Domain layers
hook in through three class methods: :meth:`ConfigBase._select` (keys that are not
fields, such as a trainer choice), :meth:`ConfigBase._header` (what ``to_yaml`` writes
first) and :meth:`ConfigBase._elsewhere` (a hint for an unknown key).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple, Self, get_args, get_origin, get_type_hints

from diffrl.config import overrides as _overrides
from diffrl.config._types import TypeMismatch, accepts, coerce, suggest, type_name
from diffrl.config._yaml import YAMLError, dump_yaml, load_yaml, load_yaml_file
from diffrl.config._errors import ConfigError, Violation
from diffrl.config.secrets import redact

__all__ = ["APPLY", "ConfigBase", "ConfigError", "FieldInfo", "Violation", "option", "resume_rule"]


class FieldInfo(NamedTuple):
    """What ``--help`` shows of one field."""

    name: str
    type: str
    default: Any
    help: str
    trl: bool
    """True for a field of TRL 0.23's config (same name, type and default), False for a diffrl extra."""


_EXTRA_FIELDS: set[dataclasses.Field] = set()
"""The diffrl extras among the fields (kept out of the metadata: HfArgumentParser passes every
metadata key on to argparse, which rejects unknown ones)."""

APPLY = "apply"
"""The resume rule of a field that may change when a run resumes (the new value applies from then on)."""
UNKNOWN_RESUME = "diffrl does not know that it can change mid-run"
_RESUME_RULES: dict[dataclasses.Field, str] = {}
"""Field -> :data:`APPLY` or the reason it cannot change mid-run (kept out of the metadata, as above)."""


_INFINITE_OK: set[dataclasses.Field] = set()
"""Float fields where ``.inf`` means "no limit"; every other float must be finite."""


def option(default: Any = dataclasses.MISSING, *, help: str, factory: Any = None, trl: bool = True,
           resume: str = UNKNOWN_RESUME, infinite: bool = False, **argparse_kwargs: Any) -> Any:
    """A dataclass field whose ``help`` is its ``--help`` text; ``trl=False`` marks a diffrl extra.

    ``resume`` is the field's rule when a run resumes with another value: :data:`APPLY`, or why it
    is refused (read by :func:`diffrl.config.resume.diff_for_resume`). ``infinite=True``: a float
    field where ``.inf`` means "no limit" (every other float must be finite). ``argparse_kwargs``
    (``nargs``, ``metavar``, ``action``) go into the metadata, which HfArgumentParser hands to
    ``argparse.add_argument``.
    """
    metadata = {"help": help, **argparse_kwargs}
    if factory is not None:
        made = dataclasses.field(default_factory=factory, metadata=metadata)
    else:
        made = dataclasses.field(default=default, metadata=metadata)
    if not trl:
        _EXTRA_FIELDS.add(made)
    _RESUME_RULES[made] = resume
    if infinite:
        _INFINITE_OK.add(made)
    return made


def resume_rule(config_cls: type, name: str) -> str:
    """The resume rule of field ``name`` of ``config_cls``: :data:`APPLY` or the reason it is refused."""
    made = config_cls.__dataclass_fields__[name]
    return _RESUME_RULES.get(made, UNKNOWN_RESUME)


def plain(value: Any) -> Any:
    """Tuples to lists, recursively, so that safe YAML and JSON can write the value."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


def _literal_choices(tp: Any) -> list[Any]:
    if get_origin(tp) is Literal:
        return list(get_args(tp))
    return [c for arg in get_args(tp) if get_origin(arg) is Literal for c in get_args(arg)]


def wrong_type(name: str, value: Any, expected: str, tp: Any) -> Violation:
    """The violation for a value of the wrong type, with the most likely fix."""
    fix = f"give {name} {expected}"
    choices = [a for a in _literal_choices(tp) if isinstance(a, str)]
    if isinstance(value, str) and (close := suggest(value, choices)):
        fix += f" (did you mean {close!r}?)"
    elif isinstance(value, str):
        try:
            parsed = load_yaml(value)
        except YAMLError:
            parsed = value
        if not isinstance(parsed, str) and accepts(parsed, tp):
            fix = f"write the value without quotes ({name}: {value})"
        elif "list" in expected:
            fix = (f"write it as a YAML list: `{name}: [a, b]` in a file, `{name}=[a,b]` or "
                   f"`--{name} a b` on the command line")
    return Violation(name, value, f"expected {expected}, got {type(value).__name__}", fix)


class ConfigBase:
    """Methods shared by the config dataclasses (which add the fields)."""

    # --- hooks for the domain layer --------------------------------------------------------

    @classmethod
    def _select(cls, data: dict[str, Any]) -> tuple[dict[str, Any], list[Violation]]:
        """Take keys that are not fields (e.g. a trainer choice) out of ``data``; returns the rest."""
        return data, []

    def _header(self) -> dict[str, Any]:
        """Keys written before the fields by :meth:`to_yaml` (read back by :meth:`_select`)."""
        return {}

    @classmethod
    def _elsewhere(cls, key: str) -> str:
        """Extra words for an unknown key that another config class has ("" when none does)."""
        return ""

    # --- fields and their types ---------------------------------------------------------

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        """Field name -> resolved type hint."""
        if "_type_cache" not in cls.__dict__:
            hints = get_type_hints(cls)
            cls._type_cache = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
        return cls._type_cache

    @classmethod
    def describe_fields(cls) -> list[FieldInfo]:
        """Name, type, default and help of every field, TRL's first: the content of ``--help``."""
        infos = []
        for f in dataclasses.fields(cls):
            infos.append(FieldInfo(f.name, type_name(cls.field_types()[f.name]), cls._default(f.name),
                                   f.metadata["help"], f not in _EXTRA_FIELDS))
        return sorted(infos, key=lambda i: not i.trl)  # stable: keeps declaration order within each group

    @classmethod
    def help_text(cls) -> str:
        """Every field with its type, default and help, as ``--help`` prints it."""
        lines = [f"{cls.__name__} fields (TRL 0.23 names and defaults first, then diffrl's):"]
        group = None
        for info in cls.describe_fields():
            if info.trl != group:
                group = info.trl
                lines.append("\n TRL fields:" if group else "\n diffrl fields:")
            lines.append(f"  --{info.name} ({info.type}, default {plain(info.default)!r})")
            lines.append(f"      {info.help}")
        return "\n".join(lines)

    @classmethod
    def _default(cls, name: str) -> Any:
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    def __post_init__(self) -> None:
        # Strict even for direct construction: wrong types raise, lossless conversions apply.
        violations = []
        for name, tp in self.field_types().items():
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, coerce(value, tp))
            except TypeMismatch as err:
                violations.append(wrong_type(name, value, str(err), tp))
        if violations:
            raise ConfigError(violations, type(self).__name__)

    # --- loading --------------------------------------------------------------------------

    @classmethod
    def _unknown(cls, key: Any, value: Any) -> Violation:
        close = suggest(str(key), cls.field_types())
        fix = f"did you mean {close!r}?" if close else "remove it; `--help` lists the fields"
        return Violation(str(key), value, f"unknown field of {cls.__name__}{cls._elsewhere(str(key))}", fix)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> Self:
        """Build a config from a mapping of field names to values.

        Unknown keys and wrong types are errors (all reported at once) that name the key.
        """
        where = f"{cls.__name__} from {source}" if source else cls.__name__
        if not isinstance(data, Mapping):
            raise ConfigError([Violation("<top level>", data, "is not a mapping", "write `field: value` lines")], where)
        rest, violations = cls._select(dict(data))
        types_ = cls.field_types()
        values = {}
        for key, value in rest.items():
            if key not in types_:
                violations.append(cls._unknown(key, value))
                continue
            try:
                values[key] = coerce(value, types_[key])
            except TypeMismatch as err:
                violations.append(wrong_type(key, value, str(err), types_[key]))
        if violations:
            raise ConfigError(violations, where)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        """Read a YAML file (YAML 1.2: ``1e-4`` is a float, ``no`` is a string)."""
        try:
            data = load_yaml_file(path)
        except YAMLError as err:
            raise ConfigError([Violation("<file>", str(path), f"is not valid YAML ({err})", "fix the syntax")]) from err
        return cls.from_dict({} if data is None else data, source=str(path))

    def with_overrides(self, overrides: Iterable[str]) -> Self:
        """A copy with command-line ``field=value`` pairs applied (:func:`diffrl.config.overrides.apply`)."""
        data = self.to_dict(redact_secrets=False)
        violations = _overrides.apply(data, overrides, self.field_types())
        try:
            result = type(self).from_dict(data, source="overrides")
        except ConfigError as err:
            raise ConfigError(violations + err.violations, f"{type(self).__name__} overrides") from None
        if violations:
            raise ConfigError(violations, f"{type(self).__name__} overrides")
        return result

    # --- writing ----------------------------------------------------------------------------

    def to_dict(self, *, redact_secrets: bool = True) -> dict[str, Any]:
        """Every field as plain data (tuples become lists); ``from_dict`` reads it back equal.

        Credentials are replaced by ``***`` (:mod:`diffrl.config.secrets`) unless
        ``redact_secrets=False``; the config itself is never changed.
        """
        data = {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {k: redact(v, k) for k, v in data.items()} if redact_secrets else data

    def to_flat_dict(self) -> dict[str, bool | int | float | str]:
        """Scalars only, nested mappings flattened with ``/``, credentials redacted: for trackers."""
        flat: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, Mapping):
                for k, v in value.items():
                    walk(f"{prefix}/{k}", v)
            elif isinstance(value, (bool, int, float, str)):
                flat[prefix] = value
            else:
                flat[prefix] = str(value)

        for key, value in self.to_dict().items():
            walk(key, value)
        return flat

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML (credentials redacted), led by the header; written to ``path`` when given."""
        text = dump_yaml({**self._header(), **self.to_dict()})
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    # --- validation ---------------------------------------------------------------------------

    def validate(self, num_processes: int = 1, *, check_environment: bool = True) -> Self:
        """Check every constraint before a model is loaded; raise one :class:`ConfigError` with all.

        ``num_processes`` is the accelerate process count (the batch rules depend on it).
        ``check_environment`` also checks what the machine must provide (packages a setting
        needs, environment variables it names, a GPU for fp16).
        """
        if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
            raise ValueError(f"num_processes must be a positive int, got {num_processes!r}")
        checks = Checks(self)
        for name, tp in self.field_types().items():
            value = getattr(self, name)
            if not accepts(value, tp):
                checks.violations.append(wrong_type(name, value, type_name(tp), tp))
                checks.bad.add(name)
            elif isinstance(value, float) and math.isnan(value):
                checks.add(name, "is NaN", f"set {name} to a number")
            elif isinstance(value, float) and math.isinf(value) and self.__dataclass_fields__[name] not in _INFINITE_OK:
                checks.add(name, "must be finite", f"set {name} to a finite number")
        self._check(checks, num_processes, check_environment)
        if checks.violations:
            raise ConfigError(checks.violations, f"{type(self).__name__} is invalid")
        return self

    def _check(self, checks: Checks, num_processes: int, check_environment: bool) -> None:
        """Subclasses add their rules to ``checks``."""


class Checks:
    """Collects violations; each helper skips fields whose type is already wrong."""

    def __init__(self, config: ConfigBase) -> None:
        self.config = config
        self.violations: list[Violation] = []
        self.bad: set[str] = set()

    def ok(self, *names: str) -> bool:
        """Whether all named fields have usable values (right type, finite numbers)."""
        return not any(n in self.bad for n in names)

    def add(self, name: str, problem: str, fix: str, value: Any = dataclasses.MISSING) -> None:
        shown = getattr(self.config, name.partition(".")[0]) if value is dataclasses.MISSING else value
        self.violations.append(Violation(name, shown, problem, fix))
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
