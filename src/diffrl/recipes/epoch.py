"""What one epoch of any recipe returns, and the one definition of every metric computed from it.

A recipe's ``run_epoch`` measures and returns an :class:`EpochResult`; :func:`epoch_metrics` turns it into the
namespaced metrics every trainer logs, so two trainers given the same rewards and timings report the same
numbers:

- ``reward/mean``, ``reward/std``, ``reward/max``, ``reward/min``: over every reward of the epoch on all processes;
  ``reward/std`` is the population standard deviation (no Bessel correction), as numpy and TRL computed it.
- ``perf/sampling_s``, ``perf/reward_s``, ``perf/training_s``: seconds this process spent drawing samples (for
  reward backpropagation: the sampling chain with gradients), scoring them (waiting for asynchronous scores
  included), and updating (backward passes and optimizer steps); ``perf/epoch_s`` is their sum.
- ``perf/samples_per_s``: the epoch's samples, all processes together, per second of sampling and scoring.
- ``reward/<key>/mean``: with a combined reward, the mean of each component (unweighted), all processes.
- every list in ``stats`` (``loss/policy``, ``stats/approx_kl``, ``stats/grad_norm``, ...): the mean over its
  entries, then over processes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch


class Timer:
    """Seconds between calls of :meth:`lap`."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed


class Timings(NamedTuple):
    """Seconds one process spent in the parts of an epoch (see the module docstring)."""

    sampling_s: float
    reward_s: float
    training_s: float


class EpochResult(NamedTuple):
    """What a recipe's ``run_epoch`` returns.

    Attributes:
        global_step: the optimizer steps taken so far, after this epoch.
        rewards: ``[P * n]`` every reward scored this epoch, all processes (gathered), float32 on the CPU.
        timings: this process's :class:`Timings`.
        stats: per-update values (``loss/...``, ``stats/...``) to average, each a list of scalar tensors.
        extra: metrics only this method has (``stats/window_start``, ``truncation/grad_steps``, ...), already
            reduced over processes.
    """

    global_step: int
    rewards: torch.Tensor
    timings: Timings
    stats: dict[str, list[torch.Tensor]]
    extra: dict[str, float]
    reward_metadata: tuple = ()
    """This process's reward metadata, one per scored batch: a combined reward's components become metrics."""

    @property
    def reward_queries(self) -> int:
        """Reward evaluations of the epoch, all processes together."""
        return int(self.rewards.numel())


def epoch_metrics(result: EpochResult, accelerator: Any) -> dict[str, float]:
    """The epoch's metrics, one definition per name (see the module docstring)."""
    rewards = result.rewards.float()
    t = result.timings
    metrics = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std(correction=0)),
               "reward/max": float(rewards.max()), "reward/min": float(rewards.min()),
               "perf/sampling_s": t.sampling_s, "perf/reward_s": t.reward_s, "perf/training_s": t.training_s,
               "perf/epoch_s": t.sampling_s + t.reward_s + t.training_s,
               "perf/samples_per_s": rewards.numel() / max(1e-9, t.sampling_s + t.reward_s)}
    for key, values in result.stats.items():
        mean = torch.stack([torch.as_tensor(v).detach().float() for v in values]).mean()
        metrics[key] = float(accelerator.reduce(mean.to(accelerator.device), "mean"))
    for key, mean in component_means(result.reward_metadata).items():
        metrics[f"reward/{key}/mean"] = float(accelerator.reduce(torch.tensor(mean, device=accelerator.device), "mean"))
    metrics.update(result.extra)
    return metrics


def component_means(metadata: Sequence[Any]) -> dict[str, float]:
    """The mean of each component of a combined reward (its metadata's ``components``, one ``[B]`` tensor per key)
    over the batches, by key; ``{}`` for other rewards."""
    parts: dict[str, list[torch.Tensor]] = {}
    for item in metadata:
        components = item.get("components") if isinstance(item, Mapping) else None
        if isinstance(components, Mapping):
            for key, values in components.items():
                parts.setdefault(str(key), []).append(torch.as_tensor(values).detach().float().flatten().cpu())
    return {key: float(torch.cat(parts[key]).mean()) for key in sorted(parts)}
