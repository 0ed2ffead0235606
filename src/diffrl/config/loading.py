"""Pick the config class from the ``trainer:``/``algorithm:`` choice (:mod:`diffrl.config.registry`)
and load it strictly."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from diffrl.config import registry
from diffrl.config._errors import ConfigError, Violation
from diffrl.config._yaml import YAMLError, load_yaml_file
from diffrl.config.overrides import parse_value
from diffrl.config.shared import SharedConfig, read_record

__all__ = ["load_config", "read_config_file", "trainer_from_overrides"]


def read_config_file(path: str | os.PathLike[str]) -> dict:
    """The mapping in a YAML config file; a missing file, a folder, bad YAML or a non-mapping is a ConfigError."""
    where = str(path)
    file = Path(path)
    if file.is_dir():
        raise ConfigError([Violation("<file>", where, "is a folder, not a YAML file",
                                     "give the .yaml file (presets are in configs/)")], where)
    if not file.is_file():
        raise ConfigError([Violation("<file>", where, "does not exist", "check the path (presets are in configs/)")],
                          where)
    try:
        data = load_yaml_file(file)
    except (YAMLError, UnicodeDecodeError) as err:
        raise ConfigError([Violation("<file>", where, f"is not valid YAML ({err})", "fix the syntax")], where) from err
    except OSError as err:
        raise ConfigError([Violation("<file>", where, f"cannot be read ({err.strerror})", "check the permissions")],
                          where) from err
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError([Violation("<top level>", data, "is not a mapping", "write `field: value` lines")], where)
    return data


def _chosen(data: dict, where: str) -> registry.TrainerSpec | None:
    spec, _, violations = registry.select({k: data[k] for k in registry.SELECTOR_KEYS if k in data})
    if violations:
        raise ConfigError(violations, where)
    return spec


def trainer_from_overrides(overrides: Sequence[str]) -> registry.TrainerSpec | None:
    """The trainer that ``trainer=``/``algorithm=`` overrides choose (None when they name none)."""
    chosen = {}
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        if sep and key.strip() in registry.SELECTOR_KEYS:
            chosen[key.strip()] = parse_value(raw.strip())
    return _chosen(chosen, "overrides")


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = (), *,
                recorded: bool = False) -> SharedConfig:
    """Load a YAML config (the defaults when ``path`` is None), then apply ``field=value`` overrides.

    The class is named by ``trainer: NAME`` or implied by ``algorithm:`` (see
    :data:`diffrl.config.registry.TRAINERS`), among the overrides first, then in the file;
    with neither it is the default trainer's (DDPO). Unknown fields and wrong types raise one
    :class:`ConfigError` naming every bad key. ``recorded=True`` reads a run's own
    ``config.yaml`` written by an older diffrl (:func:`~diffrl.config.shared.read_record`:
    renamed fields are taken under their new names); a user's file with an old name is an error that names the new one. The result
    is not validated: call ``config.validate(num_processes)`` once the process count is known.
    """
    where = str(path) if path is not None else "overrides"
    data = read_config_file(path) if path is not None else {}
    from_file = _chosen(data, where)
    from_overrides = trainer_from_overrides(overrides)
    spec = from_overrides or from_file or registry.get(registry.DEFAULT_TRAINER)
    if from_overrides and from_file and from_overrides is not from_file:
        data = {k: v for k, v in data.items() if k != registry.TRAINER_KEY}  # the command line wins
    config_cls = registry.config_class(spec.name)
    if recorded:
        data = read_record(data, config_cls)
    config = config_cls.from_dict(data, source=where)
    return config.with_overrides(overrides) if overrides else config
