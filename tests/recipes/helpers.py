"""What the trainer tests read back from a run (trainable weights, logged metrics) and the resume check they share."""

from __future__ import annotations

import json
import random

import pytest
import torch


def trainable_weights(trainer) -> dict:
    """A copy of every trainable UNet weight, by name."""
    return {n: p.detach().clone() for n, p in trainer.policy.trainable_module.named_parameters() if p.requires_grad}


def logged_metrics(tmp_path, run: str = "run") -> list[dict]:
    """The rows of ``tmp_path/logs/<run>/metrics.jsonl``."""
    lines = (tmp_path / "logs" / run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def interrupt_and_resume(make, tmp_path, stop_after: int):
    """Train run ``split`` for ``stop_after`` epochs, scramble the global RNGs (whatever happens in between must
    not matter), and build its resumed trainer; returns ``(interrupted, resumed)`` before the resumed one trains."""
    interrupted = make("split")
    interrupted.train(epochs=stop_after)
    random.seed(12345)
    torch.manual_seed(999)
    resumed = make("split", resume_from=str(tmp_path / "logs" / "split"))
    assert resumed.first_epoch == stop_after and resumed.global_step == interrupted.global_step
    return interrupted, resumed


def assert_same_run(straight, resumed, tmp_path) -> None:
    """The resumed run ended where the uninterrupted one did: the same weights and the same last metrics."""
    a, b = trainable_weights(straight), trainable_weights(resumed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    last_a, last_b = logged_metrics(tmp_path, "straight")[-1], logged_metrics(tmp_path, "split")[-1]
    for key in last_a:
        if not key.startswith("perf/"):
            assert last_a[key] == pytest.approx(last_b[key], rel=1e-5, abs=1e-7), key
