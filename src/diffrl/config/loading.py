"""Pick the config class from the ``trainer:``/``algorithm:`` choice and load it strictly."""

from __future__ import annotations

import os
from collections.abc import Sequence

from diffrl.config._base import TRAINER_KEY, ConfigError, Violation, split_trainer
from diffrl.config._yaml import YAMLError, load_yaml, load_yaml_file
from diffrl.config.alignprop import AlignPropConfig
from diffrl.config.ddpo import DDPOConfig

__all__ = ["CONFIG_CLASSES", "DEFAULT_TRAINER", "load_config"]

CONFIG_CLASSES: dict[str, type[DDPOConfig] | type[AlignPropConfig]] = {
    "ddpo": DDPOConfig,
    "alignprop": AlignPropConfig,
}
"""Trainer name (the value of ``trainer:``) -> config class."""

DEFAULT_TRAINER = "ddpo"


def _chosen_trainer(data: dict, where: str) -> str | None:
    selector = {k: data[k] for k in (TRAINER_KEY, "algorithm") if k in data}
    trainer, _, violations = split_trainer(selector)
    if violations:
        raise ConfigError(violations, where)
    return trainer


def _override_selector(overrides: Sequence[str]) -> dict:
    chosen = {}
    for item in overrides:
        key, sep, raw = str(item).partition("=")
        if sep and key.strip() in (TRAINER_KEY, "algorithm"):
            try:
                chosen[key.strip()] = load_yaml(raw.strip())
            except YAMLError:
                chosen[key.strip()] = raw.strip()
    return chosen


def load_config(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()
) -> DDPOConfig | AlignPropConfig:
    """Load a YAML config (the defaults when ``path`` is None), then apply ``field=value`` overrides.

    The class is named by ``trainer: ddpo|alignprop`` or implied by ``algorithm:``
    (``ddpo_is``, ``ddpo_sf``, ``rwr``, ``rwr_sparse`` and ``ddpo`` -> DDPO; ``alignprop``,
    ``draft_k``, ``draft_lv``, ``refl`` -> AlignProp), among the overrides first, then in the
    file; with neither it is :class:`DDPOConfig`. Unknown fields and wrong types raise one
    :class:`ConfigError` naming every bad key. The result is not validated: call
    ``config.validate(num_processes)`` once the process count is known.
    """
    where = str(path) if path is not None else "overrides"
    data: object = {}
    if path is not None:
        try:
            data = load_yaml_file(path)
        except YAMLError as err:
            raise ConfigError([Violation("<file>", where, f"is not valid YAML ({err})", "fix the syntax")]) from err
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError([Violation("<top level>", data, "is not a mapping", "write `field: value` lines")], where)
    from_file = _chosen_trainer(data, where)
    from_overrides = _chosen_trainer(_override_selector(overrides), "overrides")
    trainer = from_overrides or from_file or DEFAULT_TRAINER
    if from_overrides and from_file and from_overrides != from_file:
        data = {k: v for k, v in data.items() if k != TRAINER_KEY}  # the command line wins
    config = CONFIG_CLASSES[trainer].from_dict(data, source=where)
    return config.with_overrides(overrides) if overrides else config
