"""The trainers diffrl knows: the one place that maps a trainer name to its config, its algorithms
and its trainer class. The CLI, the presets and the config loader all read this table.

A new trainer is one :class:`TrainerSpec` entry in :data:`TRAINERS` plus its config class::

    TrainerSpec("grpo", config="diffrl.config.grpo:GRPOConfig", trainer="diffrl.recipes.trainers:GRPOTrainer",
                algorithms={"grpo": {}})

after which ``diffrl train algorithm=grpo`` and ``trainer: grpo`` select it. Classes are named
by import path (``"module:Class"``) and resolved on first use, so the table imports nothing:
the config classes import this module, and the trainer classes live in a higher layer
(``diffrl.recipes``), which resolves its own entry with :func:`resolve`.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from diffrl.config._errors import Violation

__all__ = ["DEFAULT_TRAINER", "SELECTOR_KEYS", "TRAINERS", "TrainerSpec", "config_class", "get", "resolve",
           "select", "spec_of"]

TRAINER_KEY = "trainer"
ALGORITHM_KEY = "algorithm"
SELECTOR_KEYS = (TRAINER_KEY, ALGORITHM_KEY)
"""Keys of a config file or override that choose the trainer (and are not all fields)."""


class TrainerSpec(NamedTuple):
    """One trainer: its name (the ``trainer:`` key), config class, trainer class and algorithms."""

    name: str
    config: str
    """Import path ``"module:Class"`` of the config dataclass."""
    trainer: str
    """Import path of the trainer class (resolved by the launch code with :func:`resolve`)."""
    algorithms: Mapping[str, Mapping[str, Any]]
    """``algorithm:`` value -> the config fields it sets (``{}``: the trainer's defaults)."""
    quickstart_preset: str | None = None
    """Name of the offline quickstart preset of this trainer (``diffrl/presets/<name>.yaml``)."""


def _spec(name: str, config: str, trainer: str, algorithms: dict, quickstart: str | None = None) -> TrainerSpec:
    return TrainerSpec(name, config, trainer, MappingProxyType(algorithms), quickstart)


TRAINERS: Mapping[str, TrainerSpec] = MappingProxyType({s.name: s for s in (
    _spec("ddpo", "diffrl.config.ddpo:DDPOConfig", "diffrl.recipes.trainers:DDPOTrainer",
          {"ddpo": {}, "ddpo_is": {"algorithm": "ddpo_is"}, "ddpo_sf": {"algorithm": "ddpo_sf"},
           "rwr": {"algorithm": "rwr"}, "rwr_sparse": {"algorithm": "rwr_sparse"}}, "quickstart"),
    _spec("alignprop", "diffrl.config.alignprop:AlignPropConfig", "diffrl.recipes.trainers:AlignPropTrainer",
          {"alignprop": {}, "draft_k": {"truncation": "draft_k"}, "draft_lv": {"truncation": "draft_lv"},
           "refl": {"truncation": "refl"}}, "quickstart_alignprop"),
    _spec("nft", "diffrl.config.nft:NFTConfig", "diffrl.recipes.trainers:NFTTrainer", {"nft": {}}, "quickstart_nft"),
    _spec("awm", "diffrl.config.awm:AWMConfig", "diffrl.recipes.trainers:AWMTrainer", {"awm": {}}, "quickstart_awm"),
    _spec("dgpo", "diffrl.config.dgpo:DGPOConfig", "diffrl.recipes.trainers:DGPOTrainer", {"dgpo": {}},
          "quickstart_dgpo"),
    _spec("grpo", "diffrl.config.grpo:GRPOConfig", "diffrl.recipes.trainers:GRPOTrainer", {"grpo": {"algorithm": "grpo"}},
          "quickstart_grpo"),
)})
"""Trainer name -> :class:`TrainerSpec`, in the order ``--help`` lists them."""

DEFAULT_TRAINER = "ddpo"
"""The trainer of a config that names neither ``trainer:`` nor ``algorithm:``."""


def resolve(path: str) -> Any:
    """The object named by ``"package.module:Name"``."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def get(name: str) -> TrainerSpec:
    """The spec of trainer ``name``; ``KeyError`` naming the known ones otherwise."""
    if name not in TRAINERS:
        raise KeyError(f"unknown trainer {name!r}; known: {', '.join(TRAINERS)}")
    return TRAINERS[name]


def config_class(name: str) -> type:
    """The config class of trainer ``name``."""
    return resolve(get(name).config)


def spec_of(config_cls: type) -> TrainerSpec | None:
    """The spec whose config class is ``config_cls`` or its nearest registered base class."""
    for klass in config_cls.__mro__:
        path = f"{klass.__module__}:{klass.__qualname__}"
        for spec in TRAINERS.values():
            if spec.config == path:
                return spec
    return None


def _algorithm_owner(algorithm: str) -> TrainerSpec | None:
    return next((s for s in TRAINERS.values() if algorithm in s.algorithms), None)


def select(data: Mapping[str, Any]) -> tuple[TrainerSpec | None, dict[str, Any], list[Violation]]:
    """Take the trainer choice out of a config mapping.

    ``trainer: NAME`` names it; ``algorithm: X`` implies it too and sets the fields the
    algorithm stands for (``algorithm: refl`` is AlignProp with ``truncation: refl``;
    ``algorithm: rwr`` is DDPO with its ``algorithm`` field ``rwr``). Returns
    (the spec or None when nothing is named, the remaining fields, violations).
    """
    data = dict(data)
    violations: list[Violation] = []
    spec = None
    name = data.pop(TRAINER_KEY, None)
    if name is not None:
        spec = TRAINERS.get(name) if isinstance(name, str) else None
        if spec is None:
            violations.append(Violation(TRAINER_KEY, name, "unknown trainer", f"use one of {', '.join(TRAINERS)}"))
    if ALGORITHM_KEY in data:
        algorithm = data.pop(ALGORITHM_KEY)
        owner = _algorithm_owner(algorithm) if isinstance(algorithm, str) else None
        if owner is None:
            known = [a for s in TRAINERS.values() for a in s.algorithms]
            violations.append(Violation(ALGORITHM_KEY, algorithm, "unknown algorithm", f"use one of {', '.join(known)}"))
        else:
            if spec is not None and spec is not owner:
                violations.append(Violation(ALGORITHM_KEY, algorithm,
                                            f"is a {owner.name} algorithm but trainer={spec.name!r}",
                                            f"drop one of the two, or set trainer: {owner.name}"))
            spec = owner
            for field, value in owner.algorithms[algorithm].items():
                if data.get(field) not in (value, None):
                    violations.append(Violation(field, data[field], f"contradicts algorithm={algorithm!r}",
                                                f"drop {field} or set it to {value!r}"))
                data[field] = value
    return spec, data, violations
