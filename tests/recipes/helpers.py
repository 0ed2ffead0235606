"""What the trainer tests read back from a run: trainable weights and logged metrics."""

from __future__ import annotations

import json


def trainable_weights(trainer) -> dict:
    """A copy of every trainable UNet weight, by name."""
    return {n: p.detach().clone() for n, p in trainer.policy._unet.named_parameters() if p.requires_grad}


def logged_metrics(tmp_path, run: str = "run") -> list[dict]:
    """The rows of ``tmp_path/logs/<run>/metrics.jsonl``."""
    lines = (tmp_path / "logs" / run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
