"""Losses and advantages: pure functions of tensors (DDPO-IS/SF, RWR, per-prompt statistics)."""

from diffrl.algorithms.ddpo import LossStats, ppo_clip_loss, reinforce_loss
from diffrl.algorithms.rwr import denoising_loss, rwr_sparse_weights, rwr_weights
from diffrl.algorithms.stat_tracking import PerPromptStatTracker, batch_advantages

__all__ = [
    "LossStats",
    "PerPromptStatTracker",
    "batch_advantages",
    "denoising_loss",
    "ppo_clip_loss",
    "reinforce_loss",
    "rwr_sparse_weights",
    "rwr_weights",
]
