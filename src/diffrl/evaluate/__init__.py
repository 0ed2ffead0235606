"""Evaluation: sample from models on fixed seeds, compare them on the same noise, and report.

- :mod:`~diffrl.evaluate.sample`: generation where every image's noise depends on its seed alone;
- :mod:`~diffrl.evaluate.compare`: :func:`~diffrl.evaluate.compare.evaluate_models` scores every model with every
  reward and measures per-prompt diversity, returning an :class:`~diffrl.evaluate.compare.Evaluation`;
- :mod:`~diffrl.metrics`: mean ± standard error, paired differences, diversity;
- :mod:`~diffrl.evaluate.report`: :func:`~diffrl.evaluate.report.write_report`, one self-contained HTML file;
- :mod:`~diffrl.evaluate.cli`: ``diffrl sample``, ``diffrl evaluate``, ``diffrl report``.

Submodules are imported on first use, so ``import diffrl.evaluate.cli`` (the ``diffrl`` command) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Evaluation", "ModelSource", "SampleSettings", "evaluate_models", "write_report"]

_HOME = {"Evaluation": "compare", "ModelSource": "compare", "evaluate_models": "compare",
         "SampleSettings": "sample", "write_report": "report"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"diffrl.evaluate.{_HOME[name]}"), name)
    raise AttributeError(f"module 'diffrl.evaluate' has no attribute {name!r}")
