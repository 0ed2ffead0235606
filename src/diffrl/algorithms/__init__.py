"""Losses and advantages: pure functions of tensors (DDPO-IS/SF, RWR, GRPO, DiffusionNFT, per-prompt statistics)."""

from diffrl.algorithms.ddpo import LossStats, ppo_clip_loss, reinforce_loss
from diffrl.algorithms.grpo import (
    GRPOStats,
    gathered_group_advantages,
    gaussian_mean_kl,
    group_advantages,
    grpo_loss,
    multi_reward_advantages,
    process_slice,
)
from diffrl.algorithms.nft import (
    EMA_SCHEDULES,
    EMASchedule,
    NFTStats,
    adaptive_mse,
    advantages_to_optimality,
    ema_update,
    implicit_policies,
    nft_loss,
    nft_optimality,
    prediction_kl,
    sample_train_timesteps,
)
from diffrl.algorithms.rwr import denoising_loss, rwr_sparse_weights, rwr_weights
from diffrl.algorithms.stat_tracking import PerPromptStatTracker, batch_advantages
from diffrl.algorithms.window import WINDOW_SCHEDULES, sde_window, window_start

__all__ = [
    "adaptive_mse",
    "advantages_to_optimality",
    "batch_advantages",
    "denoising_loss",
    "EMA_SCHEDULES",
    "ema_update",
    "EMASchedule",
    "gathered_group_advantages",
    "gaussian_mean_kl",
    "group_advantages",
    "grpo_loss",
    "GRPOStats",
    "implicit_policies",
    "LossStats",
    "multi_reward_advantages",
    "nft_loss",
    "nft_optimality",
    "NFTStats",
    "PerPromptStatTracker",
    "ppo_clip_loss",
    "prediction_kl",
    "process_slice",
    "reinforce_loss",
    "rwr_sparse_weights",
    "rwr_weights",
    "sample_train_timesteps",
    "sde_window",
    "WINDOW_SCHEDULES",
    "window_start",
]
