"""What the config hands to accelerate: precision, trackers, the project configuration.

Nothing here imports torch or accelerate at import time; the names are accelerate 1.x's
(``accelerate.utils.LoggerType``, ``ProjectConfiguration``), checked against the installed
accelerate by the tests.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["MIXED_PRECISION", "PROJECT_CONFIGURATION_KEYS", "TRACKERS", "TRACKER_PACKAGES", "Precision",
           "has_accelerator_device", "installed", "project_configuration_kwargs", "resolve_mixed_precision"]

MIXED_PRECISION = ("no", "fp16", "bf16")
TRL_DEFAULT_PRECISION = "fp16"

TRACKER_PACKAGES: Mapping[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "aim": ("aim",),
    "comet_ml": ("comet_ml",), "mlflow": ("mlflow",), "clearml": ("clearml",), "dvclive": ("dvclive",),
    "swanlab": ("swanlab",), "trackio": ("trackio",),
}
"""accelerate's trackers (``LoggerType``) -> the packages that provide them (any one will do)."""
TRACKERS = (None, "all", *TRACKER_PACKAGES)
"""What ``log_with`` accepts: None (no tracker), ``all`` (every installed one) or one tracker."""

PROJECT_CONFIGURATION_KEYS = ("project_dir", "logging_dir", "automatic_checkpoint_naming", "total_limit",
                              "iteration", "save_on_each_node")
"""The fields of ``accelerate.utils.ProjectConfiguration``."""


class Precision(NamedTuple):
    """The precision a run uses and who decided it."""

    value: str
    """``no``, ``fp16`` or ``bf16``."""
    source: str
    """``config``, ``accelerate`` (``accelerate launch --mixed_precision`` or its config file, through
    ``$ACCELERATE_MIXED_PRECISION``), ``TRL default`` (fp16 on a GPU) or ``no GPU``."""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (found without importing it)."""
    return importlib.util.find_spec(module) is not None


def has_accelerator_device() -> bool:
    """Whether torch sees a CUDA, XPU, NPU or MPS device (imports torch: call it at run start only)."""
    import torch  # noqa: PLC0415 - torch is heavy; the config module must stay light for `--help`

    if torch.cuda.is_available():
        return True
    for backend in ("xpu", "npu"):
        module = getattr(torch, backend, None)
        if module is not None and module.is_available():
            return True
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_mixed_precision(configured: str | None, *, environ: Mapping[str, str] | None = None,
                            gpu: bool | None = None) -> Precision:
    """The precision in force: the config's value when set, else accelerate's, else TRL's fp16 on a GPU.

    ``accelerate launch --mixed_precision X`` and accelerate's config file reach the process as
    ``$ACCELERATE_MIXED_PRECISION``. With neither, TRL's default fp16 applies on a GPU; on a CPU,
    where fp16 autocast ran 8-17x slower, it is ``no``. ``gpu`` defaults to
    :func:`has_accelerator_device` (evaluated only when it matters).
    """
    if configured is not None:
        return Precision(configured, "config")
    environ = os.environ if environ is None else environ
    launched = environ.get("ACCELERATE_MIXED_PRECISION")
    if launched:
        return Precision(launched.lower(), "accelerate")
    if gpu is None:
        gpu = has_accelerator_device()
    return Precision(TRL_DEFAULT_PRECISION, "TRL default") if gpu else Precision("no", "no GPU")


def project_configuration_kwargs(project_kwargs: Mapping[str, Any], run_dir: str | os.PathLike) -> dict[str, Any]:
    """Keyword arguments for ``accelerate.utils.ProjectConfiguration``, merged with the run folder.

    The user's ``project_dir`` and ``logging_dir`` win; without them both are ``run_dir``, so
    accelerate's checkpoints (``project_dir/checkpoints``) and tracker event files stay inside
    the run folder. ``logging_dir`` defaults to the ``project_dir`` in force. Every other key
    (``automatic_checkpoint_naming``, ``total_limit``, ...) passes through.
    """
    merged = dict(project_kwargs)
    merged["project_dir"] = os.fspath(merged.get("project_dir") or Path(run_dir))
    merged["logging_dir"] = os.fspath(merged.get("logging_dir") or merged["project_dir"])
    return merged
