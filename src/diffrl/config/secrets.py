"""Credentials in config values: never rendered, and readable from the environment instead.

* **Redaction.** :func:`redact` returns a copy of a value in which every mapping entry whose
  key names a credential (``token``, ``api_key``, ``password``, ``secret``, ... and any key
  registered with :func:`register_secret_keys`, e.g. by a reward) is replaced by ``***``, and
  the user-info of every URL (``https://user:pass@host``) by ``***``. ``config.to_yaml()``,
  ``to_dict()``, ``to_flat_dict()`` and error messages go through it, so ``config.yaml``, model
  cards, reports and trackers never see a credential. The config object itself keeps the real
  value: redaction only ever applies to a rendered copy.
* **From the environment.** A string value ``${env:NAME}`` stands for the environment variable
  ``NAME`` (``reward_options.token='${env:DIFFRL_REWARD_TOKEN}'``). The config keeps the
  reference, so files show the reference, never the secret; :func:`resolve_env` replaces the
  references when the value is used (the reward is built), and ``validate()`` reports a
  variable that is not set.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["REDACTED", "env_references", "is_secret_key", "redact", "register_secret_keys", "resolve_env"]

REDACTED = "***"
"""What a credential is rendered as."""

_SECRET_WORDS = frozenset({"token", "apikey", "password", "passwd", "secret", "credential", "credentials",
                           "authorization", "cookie"})
_SECRET_PAIRS = frozenset({("api", "key"), ("access", "key"), ("private", "key"), ("secret", "key")})
_registered: set[str] = set()
_ENV_REF = re.compile(r"^\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}$")
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")


def register_secret_keys(names: Iterable[str]) -> None:
    """Declare option names that carry credentials (a reward calls this for its own options)."""
    _registered.update(n.lower() for n in names)


def is_secret_key(key: object) -> bool:
    """Whether an option named ``key`` holds a credential, judged by its words: ``hf_token``, ``api_key``,
    ``db_password`` do; ``max_new_tokens`` and ``tokenizer`` do not."""
    name = str(key).lower().rpartition(".")[2]
    words = re.split(r"[_\-\s]+", name)
    return (name in _registered or any(w in _SECRET_WORDS for w in words)
            or any(pair in _SECRET_PAIRS for pair in zip(words, words[1:])))


def _redact_text(text: str) -> str:
    if _ENV_REF.match(text):
        return text  # a reference to the environment is not the secret
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)


def redact(value: Any, key: object = None) -> Any:
    """A copy of ``value`` with credentials replaced by ``***`` (``key`` is the name it is stored under)."""
    if key is not None and is_secret_key(key) and value not in (None, "", {}, []):
        if not (isinstance(value, str) and _ENV_REF.match(value)):
            return REDACTED
    if isinstance(value, Mapping):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return _redact_text(value)
    return value


def env_references(value: Any, path: str = "") -> list[tuple[str, str]]:
    """``(where, NAME)`` for every ``${env:NAME}`` inside ``value``."""
    if isinstance(value, Mapping):
        return [ref for k, v in value.items() for ref in env_references(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, (list, tuple)):
        return [ref for i, v in enumerate(value) for ref in env_references(v, f"{path}[{i}]")]
    if isinstance(value, str) and (match := _ENV_REF.match(value)):
        return [(path, match[1])]
    return []


def resolve_env(value: Any, environ: Mapping[str, str] | None = None) -> Any:
    """A copy of ``value`` with every ``${env:NAME}`` replaced by the variable's value.

    Raises ``KeyError`` naming the variable when it is not set (``validate()`` reports that earlier).
    """
    environ = os.environ if environ is None else environ
    if isinstance(value, Mapping):
        return {k: resolve_env(v, environ) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(resolve_env(v, environ) for v in value)
    if isinstance(value, str) and (match := _ENV_REF.match(value)):
        if match[1] not in environ:
            raise KeyError(f"environment variable {match[1]} (from {value}) is not set")
        return environ[match[1]]
    return value
