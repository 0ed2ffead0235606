"""Strict, lossless checking of config values against the fields' type hints."""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

from diffrl.registry import suggest

__all__ = ["TypeMismatch", "accepts", "coerce", "suggest", "type_name"]


class TypeMismatch(TypeError):
    """A value does not fit a type; the message is the expected type in words."""


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def type_name(tp: Any) -> str:
    """The type in the words an error message uses: ``int``, ``str or null``, ``list of 2 ints``."""
    if tp is Any:
        return "any value"
    if _is_union(tp):
        names = [type_name(a) for a in get_args(tp) if a is not type(None)]
        if type(None) in get_args(tp):
            names.append("null")
        return " or ".join(names)
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is dict or origin is dict:
        return "a mapping"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {type_name(args[0])}"
        return f"a list of {len(args)} values [{', '.join(type_name(a) for a in args)}]"
    if origin is list:
        return f"a list of {type_name(args[0]) if args else 'values'}"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp``, converting only where nothing is lost.

    Allowed conversions: int -> float, list -> tuple, any mapping -> dict.
    Everything else that does not already match raises :class:`TypeMismatch`;
    in particular ``"3"`` is not an int, ``1`` is not a bool and ``2.0`` is not an int.
    """
    if tp is Any:
        return value
    origin, args = get_origin(tp), get_args(tp)
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg)
            except TypeMismatch:
                pass
        raise TypeMismatch(type_name(tp))
    if origin is Literal:
        # compare types too: True == 1 and 1 == 1.0, but neither is the literal the other
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise TypeMismatch(type_name(tp))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, Mapping):
            key_t, val_t = args if args else (Any, Any)
            return {coerce(k, key_t): coerce(v, val_t) for k, v in value.items()}
    elif origin in (tuple, list):
        if isinstance(value, (list, tuple)):
            if origin is list or (len(args) == 2 and args[1] is Ellipsis):
                items = [coerce(v, args[0] if args else Any) for v in value]
            elif len(value) == len(args):
                items = [coerce(v, a) for v, a in zip(value, args, strict=True)]
            else:
                raise TypeMismatch(type_name(tp))
            return list(items) if origin is list else tuple(items)
    else:  # pragma: no cover - a field type this module does not know is a programming error
        raise NotImplementedError(f"config fields of type {tp!r} are not supported")
    raise TypeMismatch(type_name(tp))


def accepts(value: Any, tp: Any) -> bool:
    """Whether :func:`coerce` would accept ``value`` for ``tp``."""
    try:
        coerce(value, tp)
    except TypeMismatch:
        return False
    return True


