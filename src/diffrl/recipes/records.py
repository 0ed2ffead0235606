"""What a run writes as it goes: ``metrics.jsonl``, the console line, the trackers, and the config records."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from accelerate import Accelerator
from PIL import Image

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

    def restore(self, epoch: int, metrics: Mapping[str, float] | None, step: int) -> bool:
        """After :meth:`truncate_after`: write the checkpoint's own epoch line from the metrics the checkpoint
        holds if the run was killed between the checkpoint's commit and that line (not sent to trackers again).
        Returns whether a line was written."""
        if not self.accelerator.is_main_process or not metrics:
            return False
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if json.loads(line).get("epoch") == epoch:
                    return False
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        return True

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



class ImageFolderTracker:
    """What an image hook gets as its tracker when the run has none: ``log_images`` writes PNGs to
    ``<run>/images/step_<N>/`` (TRL's example hook calls ``accelerate_logger.log_images``, which crashed
    without a tracker); ``log`` does nothing (metrics go to ``metrics.jsonl``)."""

    name = "image_folder"

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def log(self, values: Mapping, step: int | None = None, **kwargs) -> None:
        return None

    def log_images(self, values: Mapping, step: int | None = None, **kwargs) -> None:
        target = self.folder / f"step_{step if step is not None else 0}"
        target.mkdir(parents=True, exist_ok=True)
        for i, (name, image) in enumerate(values.items()):
            safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")[:60] or "image"
            for j, picture in enumerate(_pil_images(image)):
                picture.save(target / f"{i:03d}_{j}_{safe}.png")


def _pil_images(image: Any) -> list[Image.Image]:
    if isinstance(image, Image.Image):
        return [image]
    array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3:
        array = array[None]
    if array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3):  # [N, C, H, W] -> [N, H, W, C]
        array = array.transpose(0, 2, 3, 1)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in array]
