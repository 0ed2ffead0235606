"""The sections every trainer reads, composed into :class:`SharedConfig`, and the trainer choice.

Each section (:mod:`diffrl.config.sections`) holds one concern's fields, checks and resume rules; a
trainer's config adds the sections and fields it alone reads. The TRL fields keep TRL 0.23's
names, types and defaults exactly (where TRL's two classes differ, e.g. ``train_learning_rate``,
the trainer's class redeclares the field).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple, Optional

from diffrl.config import registry
from diffrl.config._base import Checks
from diffrl.config._errors import ConfigError, Violation
from diffrl.config.sections import SIZE_FIELDS, VAE_FACTOR, ModelSection, OptimSection, RunSection, TaskSection, \
    default_exp_name, split_prompts
from diffrl.config.secrets import env_references, resolve_env

__all__ = ["RENAMED", "SIZE_FIELDS", "VAE_FACTOR", "SharedConfig", "default_exp_name", "read_record",
           "split_prompts"]

OPTION_FIELDS = ("reward_options", "prompt_options", "eval_prompt_options", "eval_rewards", "model_options",
                 "tracker_kwargs", "accelerator_kwargs", "project_kwargs")
"""Mapping fields whose string values may be ``${env:NAME}`` references."""


class Renamed(NamedTuple):
    """A field under a new name (or moved into a mapping field, ``"model_options.original_size"``)."""

    new: str
    why: str


RENAMED: Mapping[str, Renamed] = {
    "use_lora": Renamed("train_lora", "TRL's example scripts have their own --use_lora"),
    "compile_unet": Renamed("compile_model", "it compiles the network of any model family"),
    "nft_advantage_std": Renamed("adv_std", "GRPO and NFT share the choice"),
    **{f"sdxl_{name}": Renamed(f"model_options.{name}", "a model family checks its own options")
       for name in ("original_size", "target_size", "crops_coords_top_left")},
}
"""Old field name -> its new home. A user's file or override with an old name is an error naming the new one;
a run's own recorded ``config.yaml`` is read under the new names (:func:`read_record`)."""


def read_record(data: Mapping[str, Any], config_cls: type) -> dict[str, Any]:
    """A run's recorded config mapping, written by any diffrl version, under today's names for ``config_cls``:
    renamed fields take their new names, and fields the trainer no longer has (``config_cls.not_here``, which
    older versions held at their defaults) are dropped."""
    data = dict(data)
    for old, renamed in RENAMED.items():
        if old not in data:
            continue
        value = data.pop(old)
        field, _, key = renamed.new.partition(".")
        if key:
            if value is not None and value != [0, 0]:  # the old defaults (null, and no crop) set nothing
                data.setdefault(field, {})[key] = value
        else:
            data[field] = value
    for name in getattr(config_cls, "not_here", {}):
        data.pop(name, None)
    return data


class PairAction(argparse.Action):
    """``--truncated_rand_backprop_minmax 0 10`` through HfArgumentParser, which hands argparse the field's type
    (``tuple[int, int]``) as the converter of each word: that splits a word into its characters, which this action
    joins back and reads as an int."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        words = ["".join(v) if isinstance(v, tuple) else str(v) for v in values]
        try:
            pair = tuple(int(w) for w in words)
        except ValueError:
            names = " ".join(self.metavar) if isinstance(self.metavar, tuple) else "A B"
            parser.error(f"{option_string} takes two integers {names}, got {' '.join(words)}")
        setattr(namespace, self.dest, pair)


@dataclasses.dataclass
class SharedConfig(OptimSection, TaskSection, ModelSection, RunSection):
    """The run, model, task and optimisation sections: what every trainer reads; not used on its own."""

    use_lora: dataclasses.InitVar[Optional[bool]] = None
    """Not a field: ``use_lora`` was renamed to ``train_lora``; passing it raises an error naming the new name."""

    not_here: ClassVar[Mapping[str, str]] = {}
    """Fields of other trainers this one does not have -> why (the hint of the "unknown field" error)."""

    def __post_init__(self, use_lora: Optional[bool] = None) -> None:
        if use_lora is not None:
            raise ConfigError([_renamed("use_lora", use_lora)], type(self).__name__)
        super().__post_init__()

    # ---- the trainer choice (diffrl.config.registry) ----

    @classmethod
    def _select(cls, data: dict) -> tuple[dict, list[Violation]]:
        violations = [_renamed(old, data.pop(old)) for old in list(data) if old in RENAMED]
        spec, rest, more = registry.select(data)
        own = registry.spec_of(cls)
        if spec is not None and own is not None and spec is not own:
            more.append(Violation(registry.TRAINER_KEY, spec.name, f"selects {spec.config.rpartition(':')[2]}, "
                                  f"not {cls.__name__}", "load it with diffrl.config.load_config, which picks the "
                                  "class"))
        return rest, violations + more

    def _header(self) -> dict:
        spec = registry.spec_of(type(self))
        return {registry.TRAINER_KEY: spec.name} if spec else {}

    @classmethod
    def _elsewhere(cls, key: str) -> str:
        if key in cls.not_here:
            return f": {cls.not_here[key]}"
        own = registry.spec_of(cls)
        for spec in registry.TRAINERS.values():
            if spec is not own and key in registry.config_class(spec.name).field_types():
                return f" (a field of {spec.config.rpartition(':')[2]}, selected by `trainer: {spec.name}`)"
        return ""

    def resolved(self, name: str) -> dict:
        """The mapping field ``name`` with every ``${env:NAME}`` replaced by the environment variable
        (build the reward from ``config.resolved("reward_options")``)."""
        return resolve_env(getattr(self, name))

    # ---- validation: the sections check their own fields; here what spans them ----

    def _check(self, c: Checks, num_processes: int, check_environment: bool) -> None:
        super()._check(c, num_processes, check_environment)
        if not check_environment:
            return
        for name in OPTION_FIELDS:
            for where, variable in env_references(getattr(self, name)) if c.ok(name) else ():
                if variable not in os.environ:
                    c.add(f"{name}.{where}", f"reads the environment variable {variable}, which is not set",
                          f"export {variable}=... before the run", value=f"${{env:{variable}}}")


def _renamed(old: str, value: object) -> Violation:
    new, why = RENAMED[old]
    field, _, key = new.partition(".")
    if key:
        fix = f"write {field}: {{{key}: {value!r}}} (or {new}={value!r}) instead"
    else:
        fix = f"write {new}: {value!r} (or {new}={value!r}) instead"
    return Violation(old, value, f"was renamed to {new} ({why})", fix)
