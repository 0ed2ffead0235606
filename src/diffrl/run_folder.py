"""The layout of a run folder ``<logdir>/<run_name>/``, shared by the trainers that write it and by
``diffrl sample / evaluate / report``, which read it.

::

    config.yaml                  the run's settings (secrets redacted)
    config.resume-<epoch>.yaml   the settings of each resume, when they changed
    metrics.jsonl                one JSON line per epoch
    checkpoints/checkpoint_<epoch>/trainable.safetensors, optimizer.pt, ... (see diffrl.checkpoint)
    final/  best/                fine-tuned models (diffusers / PEFT folders)
    report.html
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.html"
RESULT_FOLDERS = ("final", "best")
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "lr_scheduler.pt"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, or of a run folder's; an empty list when there is none.
    A torn last line (a run killed while writing it) is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
