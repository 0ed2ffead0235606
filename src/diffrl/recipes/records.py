"""What a run writes as it goes: ``metrics.jsonl``, the console line, the trackers, and the config records."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Mapping

from accelerate import Accelerator

from diffrl.checkpoint import write_text_atomically
from diffrl.run_folder import CONFIG_FILE, METRICS_FILE
_CONSOLE_KEYS = ("epoch", "reward/mean", "reward/std", "loss/policy", "loss/reward", "stats/approx_kl",
                 "stats/clipfrac", "stats/kl_ref", "eval/reward_mean", "perf/epoch_s")


class MetricsLogger:
    """Namespaced metrics to the console, to ``metrics.jsonl`` in the run folder, and to accelerate's trackers.

    One line per epoch: a resumed run first drops the lines of epochs after its checkpoint
    (:meth:`truncate_after`), so any number of kills and resumes leave exactly one line per epoch.
    """

    def __init__(self, accelerator: Accelerator, run_dir: Path, quiet: bool = False) -> None:
        self.accelerator = accelerator
        self.path = run_dir / METRICS_FILE
        self.quiet = quiet

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items()}
        self.accelerator.log(clean, step=step)
        if not self.accelerator.is_main_process:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
            f.flush()
        if not self.quiet:
            shown = [k for k in _CONSOLE_KEYS if k in clean]
            print(" ".join(f"{k}={clean[k]:.4g}" for k in shown), file=sys.stderr, flush=True)

    def truncate_after(self, epoch: int) -> int:
        """Keep only the lines of epochs ``<= epoch`` (and drop a torn last line); returns how many were dropped."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if record.get("epoch", -1) <= epoch:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            write_text_atomically(self.path, "".join(x + "\n" for x in kept))
        return dropped


def write_config_record(run_dir: Path, config_yaml: str, resumed_epoch: int | None) -> Path:
    """``config.yaml`` for a new run; a resumed run keeps it and adds ``config.resume-<epoch>.yaml``."""
    name = CONFIG_FILE if resumed_epoch is None else f"config.resume-{resumed_epoch}.yaml"
    return write_text_atomically(run_dir / name, config_yaml)

