"""YAML with the YAML 1.2 core schema, strict about duplicate keys.

PyYAML implements YAML 1.1, which reads ``1e-4`` as the *string* "1e-4" (its
float pattern needs a dot) and ``no``/``on``/``yes`` as booleans, so
``mixed_precision: no`` would silently become ``False``. Configs are full of
both, so we load with the 1.2 core schema instead (only ``true``/``false`` are
booleans; ``1e-4`` is a float) and refuse mappings that repeat a key.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, ClassVar

import yaml

__all__ = ["YAMLError", "dump_yaml", "load_yaml", "load_yaml_file"]

YAMLError = yaml.YAMLError

# Patterns of the YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution).
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_RESOLVERS = [  # order matters: the first pattern that matches wins, so ints before floats
    ("tag:yaml.org,2002:bool", _BOOL, list("tTfF")),
    ("tag:yaml.org,2002:int", _INT, list("-+0123456789")),
    ("tag:yaml.org,2002:float", _FLOAT, list("-+.0123456789")),
    ("tag:yaml.org,2002:null", _NULL, ["~", "n", "N", ""]),
]


class _Loader(yaml.SafeLoader):
    yaml_implicit_resolvers: ClassVar[dict] = {}  # our own, not SafeLoader's YAML 1.1 ones

    def construct_mapping(self, node, deep=False):  # PyYAML's hook, made to refuse duplicate keys
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text, 10)  # "010" is ten, not YAML 1.1's octal eight


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    if text.endswith(".inf"):
        return -math.inf if text.startswith("-") else math.inf
    if text == ".nan":
        return math.nan
    return float(text)


for _tag, _pattern, _first in _RESOLVERS:
    _Loader.add_implicit_resolver(_tag, _pattern, _first)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


class _Dumper(yaml.SafeDumper):
    """Quotes every string that a YAML 1.1 *or* 1.2 reader would take for a non-string."""

    yaml_implicit_resolvers = copy.deepcopy(yaml.SafeDumper.yaml_implicit_resolvers)


for _tag, _pattern, _first in _RESOLVERS:
    _Dumper.add_implicit_resolver(_tag, _pattern, _first)


def load_yaml(text: str) -> Any:
    """Parse one YAML document with the 1.2 core schema; duplicate keys are an error."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def load_yaml_file(path: str | Path) -> Any:
    """Read and parse a YAML file (see :func:`load_yaml`)."""
    return load_yaml(Path(path).read_text(encoding="utf-8"))


def dump_yaml(data: Any) -> str:
    """Dump plain data (dicts, lists, scalars) so that :func:`load_yaml` reads it back equal."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
