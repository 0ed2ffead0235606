"""Typed, strict configuration: TRL 0.23's ``DDPOConfig``/``AlignPropConfig`` and diffrl's extras.

* Field names, types and defaults of TRL's two classes are kept (``mixed_precision`` defaults to
  null, which follows accelerate and falls back to TRL's fp16 on a GPU); the diffrl extras default
  to TRL's behaviour and never clash with the fields of TRL's example scripts.
* Unknown keys and wrong types are errors that name the key (with the closest field);
  ``validate()`` checks every constraint before a model is loaded and reports them all at
  once, each with the field, its value and the fix.
* YAML files and ``field=value`` overrides are read with the YAML 1.2 core schema
  (``1e-4`` is a float, ``no`` is a string, ``010`` is ten); :func:`parse_key_value` is the
  one ``key=value`` reader of every subcommand.
* The trainers, their config classes and algorithms are one table: :mod:`diffrl.config.registry`.
* Credentials are redacted whenever a config is rendered (:mod:`diffrl.config.secrets`).
"""

from diffrl.config import registry
from diffrl.config._base import FieldInfo
from diffrl.config._errors import ConfigError, Violation
from diffrl.config.accelerate_settings import Precision
from diffrl.config.alignprop import AlignPropConfig
from diffrl.config.ddpo import DDPOConfig
from diffrl.config.awm import AWMConfig
from diffrl.config.dgpo import DGPOConfig
from diffrl.config.grpo import GRPOConfig
from diffrl.config.loading import load_config, read_config_file, trainer_from_overrides
from diffrl.config.nft import NFTConfig
from diffrl.config.overrides import KeyValueError, from_cli_args, parse_key_value
from diffrl.config.resume import ResumeChange, ResumeDiff, diff_for_resume
from diffrl.config.schedule import LRSchedule
from diffrl.config.shared import RENAMED, SharedConfig, split_prompts

__all__ = [
    "RENAMED",
    "AlignPropConfig",
    "ConfigError",
    "DDPOConfig",
    "FieldInfo",
    "GRPOConfig",
    "AWMConfig",
    "DGPOConfig",
    "KeyValueError",
    "LRSchedule",
    "NFTConfig",
    "Precision",
    "ResumeChange",
    "ResumeDiff",
    "SharedConfig",
    "Violation",
    "diff_for_resume",
    "from_cli_args",
    "load_config",
    "parse_key_value",
    "read_config_file",
    "registry",
    "split_prompts",
    "trainer_from_overrides",
]
