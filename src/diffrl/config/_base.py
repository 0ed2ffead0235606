"""The machinery every config class shares: strict loading, overrides, dumping, validation.

A config class is a plain dataclass that derives from :class:`ConfigBase` and
names its trainer (``class DDPOConfig(SharedConfig, trainer="ddpo")``); its
fields carry their ``--help`` text in ``metadata["help"]``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Self, get_type_hints

from diffrl.config._types import TypeMismatch, accepts, coerce, suggest, type_name
from diffrl.config._yaml import YAMLError, dump_yaml, load_yaml, load_yaml_file

__all__ = ["ConfigBase", "ConfigError", "FieldInfo", "Violation", "option", "split_trainer"]

TRAINER_KEY = "trainer"
"""Top-level key that names the trainer (``ddpo`` or ``alignprop``) in a config file."""

_REGISTRY: dict[str, type[ConfigBase]] = {}

# `algorithm: X` in a file picks the trainer as well: value -> (trainer, value of the field it sets)
_ALGORITHMS: dict[str, tuple[str, str, str | None]] = {
    "ddpo": ("ddpo", "algorithm", None),
    "ddpo_is": ("ddpo", "algorithm", "ddpo_is"),
    "ddpo_sf": ("ddpo", "algorithm", "ddpo_sf"),
    "rwr": ("ddpo", "algorithm", "rwr"),
    "rwr_sparse": ("ddpo", "algorithm", "rwr_sparse"),
    "alignprop": ("alignprop", "truncation", None),
    "draft_k": ("alignprop", "truncation", "draft_k"),
    "draft_lv": ("alignprop", "truncation", "draft_lv"),
    "refl": ("alignprop", "truncation", "refl"),
}


class Violation(NamedTuple):
    """One broken rule: the field, its value, what is wrong and how to fix it."""

    field: str
    value: Any
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.field}={self.value!r}: {self.problem}. Fix: {self.fix}"


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


class FieldInfo(NamedTuple):
    """What ``--help`` shows of one field."""

    name: str
    type: str
    default: Any
    help: str
    trl: bool
    """True for a field of TRL 0.23's config (same name, type and default), False for a diffrl extra."""


_EXTRA_FIELDS: set[dataclasses.Field] = set()
"""The diffrl extras among the fields (the metadata holds only ``help``: HfArgumentParser
passes every metadata key on to argparse, which rejects unknown ones)."""


def option(default: Any = dataclasses.MISSING, *, help: str, factory: Any = None, trl: bool = True) -> Any:
    """A dataclass field whose ``help`` is its ``--help`` text; ``trl=False`` marks a diffrl extra."""
    if factory is not None:
        made = dataclasses.field(default_factory=factory, metadata={"help": help})
    else:
        made = dataclasses.field(default=default, metadata={"help": help})
    if not trl:
        _EXTRA_FIELDS.add(made)
    return made


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so that safe YAML and JSON can write the value."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _wrong_type(name: str, value: Any, expected: str, tp: Any) -> Violation:
    fix = f"give {name} {expected}"
    if isinstance(value, str):
        try:
            parsed = load_yaml(value)
        except YAMLError:
            parsed = value
        if not isinstance(parsed, str) and accepts(parsed, tp):
            fix = f"write the value without quotes ({name}: {value})"
        elif "list" in expected:
            fix = f"write it as a YAML list: `{name}: [a, b]` in a file, `{name}=[a,b]` on the command line"
    return Violation(name, value, f"expected {expected}, got {type(value).__name__}", fix)


def split_trainer(data: Mapping[str, Any]) -> tuple[str | None, dict[str, Any], list[Violation]]:
    """Take the trainer choice out of a config mapping.

    ``trainer: ddpo|alignprop`` names it; ``algorithm: X`` implies it too:
    ``ddpo_is``/``ddpo_sf``/``rwr``/``rwr_sparse`` stay as DDPOConfig's ``algorithm`` field,
    ``ddpo`` means DDPO with the default algorithm, ``alignprop`` means AlignProp with the
    default truncation, and ``draft_k``/``draft_lv``/``refl`` set AlignPropConfig's ``truncation``.
    Returns (trainer or None, the remaining fields, violations).
    """
    data = dict(data)
    violations: list[Violation] = []
    trainer = data.pop(TRAINER_KEY, None)
    if trainer is not None and trainer not in _REGISTRY:
        violations.append(Violation(TRAINER_KEY, trainer, "unknown trainer", f"use one of {', '.join(_REGISTRY)}"))
        trainer = None
    if "algorithm" in data:
        algorithm = data.pop("algorithm")
        if not isinstance(algorithm, str) or algorithm not in _ALGORITHMS:
            violations.append(
                Violation("algorithm", algorithm, "unknown algorithm", f"use one of {', '.join(_ALGORITHMS)}")
            )
        else:
            implied, target, value = _ALGORITHMS[algorithm]
            if trainer is not None and trainer != implied:
                violations.append(
                    Violation(
                        "algorithm",
                        algorithm,
                        f"is a {implied} algorithm but trainer={trainer!r}",
                        f"drop one of the two, or set trainer: {implied}",
                    )
                )
            trainer = implied
            if value is not None:
                if data.get(target) not in (value, None):
                    violations.append(
                        Violation(
                            target,
                            data[target],
                            f"contradicts algorithm={algorithm!r}",
                            f"drop {target} or set it to {value!r}",
                        )
                    )
                data[target] = value
    return trainer, data, violations


class ConfigBase:
    """Methods shared by the config dataclasses (which add the fields)."""

    trainer: ClassVar[str]
    """Which trainer the class configures; the ``trainer:`` key of its YAML form."""

    may_be_infinite: ClassVar[frozenset[str]] = frozenset()
    """Float fields where ``.inf`` means "no limit"; every other float must be finite."""

    def __init_subclass__(cls, trainer: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if trainer is not None:
            cls.trainer = trainer
            _REGISTRY[trainer] = cls

    # --- fields and their types ---------------------------------------------------------

    @classmethod
    def _types(cls) -> dict[str, Any]:
        if "_type_cache" not in cls.__dict__:
            hints = get_type_hints(cls)
            cls._type_cache = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}
        return cls._type_cache

    @classmethod
    def describe_fields(cls) -> list[FieldInfo]:
        """Name, type, default and help of every field, TRL's first: the content of ``--help``."""
        infos = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            infos.append(FieldInfo(f.name, type_name(cls._types()[f.name]), default, f.metadata["help"],
                                   f not in _EXTRA_FIELDS))
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
            lines.append(f"  {info.name} ({info.type}, default {_plain(info.default)!r})")
            lines.append(f"      {info.help}")
        return "\n".join(lines)

    @classmethod
    def _default(cls, name: str) -> Any:
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    def __post_init__(self) -> None:
        # Strict even for direct construction: wrong types raise, lossless conversions apply.
        violations = []
        for name, tp in self._types().items():
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, coerce(value, tp))
            except TypeMismatch as err:
                violations.append(_wrong_type(name, value, str(err), tp))
        if violations:
            raise ConfigError(violations, type(self).__name__)

    # --- loading --------------------------------------------------------------------------

    @classmethod
    def _unknown(cls, key: Any, value: Any) -> Violation:
        close = suggest(str(key), cls._types())
        fix = f"did you mean {close!r}?" if close else "remove it; `--help` lists the fields"
        problem = f"unknown field of {cls.__name__}"
        for other in _REGISTRY.values():
            if other is not cls and key in other._types():
                problem += f" (a field of {other.__name__}, selected by `{TRAINER_KEY}: {other.trainer}`)"
                break
        return Violation(str(key), value, problem, fix)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> Self:
        """Build a config from a mapping of field names to values.

        Unknown keys and wrong types are errors (all reported at once) that name the key;
        a ``trainer:``/``algorithm:`` choice of the other trainer is an error too.
        """
        where = f"{cls.__name__} from {source}" if source else cls.__name__
        if not isinstance(data, Mapping):
            raise ConfigError([Violation("<top level>", data, "is not a mapping", "write `field: value` lines")], where)
        trainer, rest, violations = split_trainer(data)
        if trainer is not None and trainer != cls.trainer:
            violations.append(
                Violation(TRAINER_KEY, trainer, f"selects {_REGISTRY[trainer].__name__}, not {cls.__name__}",
                          "load it with diffrl.config.load_config, which picks the class")
            )
        types_ = cls._types()
        values = {}
        for key, value in rest.items():
            if key not in types_:
                violations.append(cls._unknown(key, value))
                continue
            try:
                values[key] = coerce(value, types_[key])
            except TypeMismatch as err:
                violations.append(_wrong_type(key, value, str(err), types_[key]))
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
        """A copy with command-line ``field=value`` pairs applied (values are YAML).

        ``truncated_rand_backprop_minmax=[0,50]`` gives a tuple, ``train_batch_size=4`` an int.
        For a text field the raw text is kept when its YAML reading is not text
        (``run_name=2024`` is the name "2024"). ``reward_options.digit=7`` sets one key of a
        mapping field.
        """
        data = self.to_dict()
        violations: list[Violation] = []
        types_ = self._types()
        for item in overrides:
            key, sep, raw = str(item).partition("=")
            key, raw = key.strip(), raw.strip()
            if not sep or not key:
                violations.append(Violation(str(item), item, "is not a field=value pair", "write it as field=value"))
                continue
            try:
                parsed = load_yaml(raw)
            except YAMLError:
                if key in types_ and not accepts(raw, types_[key]):
                    violations.append(Violation(key, raw, "is not valid YAML", "quote it or fix the brackets"))
                    continue
                parsed = raw
            head, dot, tail = key.partition(".")
            if dot and head in types_ and accepts({}, types_[head]):
                target = data[head] = dict(data[head] or {})
                *parents, last = tail.split(".")
                for part in parents:
                    target = target.setdefault(part, {})
                    if not isinstance(target, dict):
                        violations.append(Violation(key, raw, f"{part} is not a mapping", f"set {head} as a whole"))
                        break
                else:
                    target[last] = parsed
                continue
            tp = types_.get(key)
            if key == TRAINER_KEY or (tp is not None and not accepts(parsed, tp) and accepts(raw, tp)):
                parsed = raw
            data[key] = parsed
        try:
            result = type(self).from_dict(data, source="overrides")
        except ConfigError as err:
            raise ConfigError(violations + err.violations, f"{type(self).__name__} overrides") from None
        if violations:
            raise ConfigError(violations, f"{type(self).__name__} overrides")
        return result

    # --- writing ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain data (tuples become lists); ``from_dict`` reads it back equal."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_flat_dict(self) -> dict[str, bool | int | float | str]:
        """Scalars only, nested mappings flattened with ``/``: for trackers' hyperparameters."""
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
        """The config as YAML, led by ``trainer:``; written to ``path`` when given."""
        text = dump_yaml({TRAINER_KEY: self.trainer, **self.to_dict()})
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    # --- validation ---------------------------------------------------------------------------

    def validate(self, num_processes: int = 1, *, check_environment: bool = True) -> Self:
        """Check every constraint before a model is loaded; raise one :class:`ConfigError` with all.

        ``num_processes`` is the accelerate process count (the batch rules depend on it).
        ``check_environment`` also checks that optional packages a setting needs are installed.
        Whether ``resume_from`` exists is checked when resuming, not here.
        """
        if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
            raise ValueError(f"num_processes must be a positive int, got {num_processes!r}")
        from diffrl.config._checks import Checks  # imported here: _checks imports this module

        checks = Checks(self)
        for name, tp in self._types().items():
            value = getattr(self, name)
            if not accepts(value, tp):
                checks.violations.append(_wrong_type(name, value, type_name(tp), tp))
                checks.bad.add(name)
            elif isinstance(value, float) and math.isnan(value):
                checks.add(name, "is NaN", f"set {name} to a number")
            elif isinstance(value, float) and math.isinf(value) and name not in self.may_be_infinite:
                checks.add(name, "must be finite", f"set {name} to a finite number")
        self._check(checks, num_processes, check_environment)
        if checks.violations:
            raise ConfigError(checks.violations, f"{type(self).__name__} is invalid")
        return self

    def _check(self, checks: Any, num_processes: int, check_environment: bool) -> None:
        """Subclasses add their rules to ``checks``."""
