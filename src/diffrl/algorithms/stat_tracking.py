"""Reward normalisation into advantages, globally or per prompt (DDPO's per-prompt stat tracking)."""

from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np


def batch_advantages(rewards: np.ndarray) -> np.ndarray:
    """``(r - mean) / (std + 1e-8)`` over the batch."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + 1e-8)


class PerPromptStatTracker:
    """Normalises each reward by the statistics of its own prompt's recent rewards.

    Keeps the last ``buffer_size`` rewards per prompt. Until a prompt has ``min_count`` rewards, its samples
    are normalised with the whole batch's mean and std instead (as ddpo-pytorch does).
    """

    def __init__(self, buffer_size: int, min_count: int) -> None:
        if min_count > buffer_size:
            raise ValueError(f"min_count={min_count} can never be reached with buffer_size={buffer_size}.")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.history: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        if len(prompts) != len(rewards):
            raise ValueError(f"{len(prompts)} prompts for {len(rewards)} rewards.")
        advantages = np.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std() + 1e-8
        prompts = list(prompts)
        for prompt in dict.fromkeys(prompts):
            idx = [i for i, p in enumerate(prompts) if p == prompt]
            buffer = self.history.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[idx].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = float(np.mean(buffer)), float(np.std(buffer)) + 1e-8
            advantages[idx] = (rewards[idx] - mean) / std
        return advantages

    def stats(self) -> dict[str, float]:
        counts = [len(v) for v in self.history.values()]
        return {"prompts": float(len(counts)), "mean_count": float(np.mean(counts)) if counts else 0.0}

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = int(state["buffer_size"]), int(state["min_count"])
        self.history = {k: deque(v, maxlen=self.buffer_size) for k, v in state["history"].items()}
