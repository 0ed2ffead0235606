"""Configs shipped with the package: the offline quickstart of each trainer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from diffrl.config import ConfigError, Violation, registry
from diffrl.config.loading import trainer_from_overrides

__all__ = ["PRESETS_DIR", "preset_path", "quickstart_preset"]

PRESETS_DIR = Path(__file__).parent


def preset_path(name: str) -> Path:
    """The shipped preset ``name`` (``FileNotFoundError`` listing the shipped ones otherwise)."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no preset named '{name}'; shipped presets: {known}")
    return path


def quickstart_preset(overrides: Sequence[str] = ()) -> Path:
    """The quickstart preset of the trainer that the overrides choose (``trainer=``/``algorithm=``;
    DDPO's without either), from :data:`diffrl.config.registry.TRAINERS`."""
    spec = trainer_from_overrides(overrides)
    spec = spec or registry.get(registry.DEFAULT_TRAINER)
    if spec.quickstart_preset is None:
        raise ConfigError([Violation(registry.TRAINER_KEY, spec.name, "has no offline quickstart",
                                     "give a config file: diffrl train CONFIG.yaml")], "overrides")
    return preset_path(spec.quickstart_preset)
