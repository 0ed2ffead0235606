"""``key=value`` on the command line: one reading for every subcommand.

Values are YAML 1.2 (:mod:`diffrl.config._yaml`): ``4`` is an int, ``1e-4`` a float, ``true``
a bool, ``null`` None, ``[0, 10]`` a list, ``{a: 1}`` a mapping; ``no``/``on`` and anything
else that is not valid YAML stay text. JSON is a subset of YAML 1.2, so what ``--option``
took as JSON before means the same now. :func:`parse_key_value` is the one parser;
``diffrl train`` also accepts HfArgumentParser's ``--field value``/``--field=value``
(:func:`from_cli_args`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from diffrl.config._errors import Violation
from diffrl.config._types import accepts
from diffrl.config._yaml import YAMLError, load_yaml

__all__ = ["KeyValueError", "apply", "from_cli_args", "is_key_value", "parse_key_value", "parse_value"]


class KeyValueError(ValueError):
    """A command-line item that is not ``key=value`` (an ``argparse.ArgumentTypeError``-style message)."""


def parse_value(raw: str) -> Any:
    """The YAML 1.2 reading of ``raw``; the raw text itself when it is not valid YAML."""
    try:
        return load_yaml(raw)
    except YAMLError:
        return raw


def parse_key_value(text: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)`` with the value read by :func:`parse_value`.

    Raises :class:`KeyValueError` when there is no ``=`` or no key. Use it for every
    ``key=value`` a subcommand takes (``diffrl evaluate --option``, ``serve-reward --option``).
    """
    key, sep, raw = str(text).partition("=")
    if not sep or not key.strip():
        raise KeyValueError(f"{text!r} is not a key=value pair; write it as key=value")
    return key.strip(), parse_value(raw.strip())


_PAIR = re.compile(r"^[A-Za-z_][\w.]*=")


def is_key_value(word: str) -> bool:
    """Whether a command-line word is a ``key=value`` pair (a key is a dotted identifier)."""
    return bool(_PAIR.match(word))


class _Pair(NamedTuple):
    key: str
    values: list[str]
    flag: bool  # came as --key ...


def from_cli_args(args: Sequence[str]) -> list[str]:
    """Turn ``diffrl train``'s free arguments into ``key=value`` overrides.

    ``field=value``, ``--field=value``, ``--field value``, ``--field v1 v2`` (a list, e.g.
    ``--truncated_rand_backprop_minmax 0 10``) and a bare ``--flag`` (``true``, as
    HfArgumentParser's bool flags) are accepted; ``--no_flag`` means ``flag=false``.
    Hyphens in a ``--field-name`` become underscores. Anything else raises :class:`KeyValueError`.
    """
    pairs: list[_Pair] = []
    for arg in args:
        if arg.startswith("--") and len(arg) > 2:
            key, sep, raw = arg[2:].partition("=")
            pairs.append(_Pair(key.replace("-", "_"), [raw] if sep else [], True))
        elif pairs and pairs[-1].flag and not _PAIR.match(arg):
            pairs[-1].values.append(arg)
        elif _PAIR.match(arg):
            key, _, raw = arg.partition("=")
            pairs.append(_Pair(key, [raw], False))
        else:
            raise KeyValueError(f"{arg!r} is neither field=value nor --field value")
    out = []
    for key, values, flag in pairs:
        if not values:
            if key.startswith("no_"):
                out.append(f"{key[3:]}=false")
            else:
                out.append(f"{key}=true")
        elif len(values) == 1:
            out.append(f"{key}={values[0]}")
        else:  # several words: a list, each item read as YAML (JSON is YAML 1.2)
            out.append(f"{key}={json.dumps([parse_value(v) for v in values])}")
    return out


def apply(data: dict[str, Any], overrides: Iterable[str], types: dict[str, Any]) -> list[Violation]:
    """Apply ``field=value`` overrides to ``data`` (field -> value) in place; return the violations.

    For a text field the raw text is kept when its YAML reading is not text
    (``run_name=2024`` is the name "2024"); a single value for a list field is a
    one-item list; ``reward_options.digit=7`` sets one key of a mapping field.
    """
    violations = []
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            violations.append(Violation(str(item), item, "is not a field=value pair", "write it as field=value"))
            continue
        try:
            parsed = load_yaml(raw)
        except YAMLError:
            if key in types and not accepts(raw, types[key]):
                violations.append(Violation(key, raw, "is not valid YAML", "quote it or fix the brackets"))
                continue
            parsed = raw
        head, dot, tail = key.partition(".")
        if dot and head in types and accepts({}, types[head]):
            target = data[head] = dict(data.get(head) or {})
            *parents, last = tail.split(".")
            for part in parents:
                target = target.setdefault(part, {})
                if not isinstance(target, dict):
                    violations.append(Violation(key, raw, f"{part} is not a mapping", f"set {head} as a whole"))
                    break
            else:
                target[last] = parsed
            continue
        tp = types.get(key)
        if tp is not None and not accepts(parsed, tp):
            if accepts(raw, tp):
                parsed = raw
            elif not isinstance(parsed, (list, dict)) and accepts([parsed], tp):
                parsed = [parsed]
        data[key] = parsed
    return violations
