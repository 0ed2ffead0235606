"""Typed, strict configuration: TRL 0.23's ``DDPOConfig``/``AlignPropConfig`` and diffrl's extras.

* Field names, types and defaults of TRL's two classes are kept exactly; the diffrl extras
  default to TRL's behaviour.
* Unknown keys and wrong types are errors that name the key (with the closest field);
  ``validate()`` checks every constraint before a model is loaded and reports them all at
  once, each with the field, its value and the fix.
* YAML files and ``field=value`` overrides are read with the YAML 1.2 core schema
  (``1e-4`` is a float, ``no`` is a string).
"""

from diffrl.config._base import ConfigError, FieldInfo, Violation
from diffrl.config.alignprop import AlignPropConfig
from diffrl.config.ddpo import DDPOConfig
from diffrl.config.loading import CONFIG_CLASSES, load_config
from diffrl.config.shared import SharedConfig, split_prompts

__all__ = [
    "CONFIG_CLASSES",
    "AlignPropConfig",
    "ConfigError",
    "DDPOConfig",
    "FieldInfo",
    "SharedConfig",
    "Violation",
    "load_config",
    "split_prompts",
]
