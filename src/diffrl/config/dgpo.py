"""DGPOConfig: Direct Group Preference Optimization (Luo et al., ICLR 2026) on the forward-process fields.

It samples as DiffusionNFT does (:class:`~diffrl.config.nft.ForwardProcessConfig`: deterministic ODE rollouts by
default, group advantages, the old policy's EMA); training minibatches hold whole groups, each group noised at one
timestep with one noise, and the loss is the group preference objective of :mod:`diffrl.algorithms.dgpo`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from diffrl.config._base import Checks, option
from diffrl.config.nft import EMAScheduleName, ForwardProcessConfig
from diffrl.config.resume import OBJECTIVE

__all__ = ["DGPOConfig", "DGPOReference"]

DGPOReference = Literal["frozen", "old"]


@dataclasses.dataclass
class DGPOConfig(ForwardProcessConfig):
    """Configuration of ``DGPOTrainer``: the epoch of :class:`~diffrl.config.nft.ForwardProcessConfig`, trained with
    DGPO's group preference loss. On-policy by default (``nft_ema_schedule: none``: the current weights sample each
    epoch); ``train_batch_size`` and ``sample_batch_size`` are multiples of ``group_size`` (a minibatch holds whole
    groups; for an unconditional model a group is ``group_size`` consecutive samples)."""

    nft_ema_schedule: EMAScheduleName = option(
        "none", trl=False, resume=OBJECTIVE,
        help="Decay of the old (sampling) policy's EMA by optimizer step: 'none' (the current weights sample each "
             "epoch: on-policy, DGPO's default), 'linear' or 'warm_start' (NFT's off-policy schedules).")
    dgpo_beta: float = option(100.0, trl=False, resume=OBJECTIVE,
                              help="DGPO's beta_dpo: the scale of the implicit rewards' margin inside the sigmoid "
                                   "(the paper's SD3.5 runs: 10 to 100; larger is a sharper group weighting).")
    dgpo_reference: DGPOReference = option(
        "frozen", trl=False, resume=OBJECTIVE,
        help="The model the implicit rewards are relative to: 'frozen' (the model before fine-tuning, Diffusion-DPO's "
             "and DGPO's default; LoRA adapters off) or 'old' (the old policy: the weights that sampled the epoch, "
             "or their EMA with an nft_ema_schedule: TDM-R1's dynamic reference).")

    def _check(self, c: Checks, num_processes: int, check_environment: bool) -> None:
        super()._check(c, num_processes, check_environment)
        c.positive("dgpo_beta", "set dgpo_beta > 0 (the paper: 10 to 100)")
        if not c.ok("group_size", "train_batch_size", "sample_batch_size") or self.group_size < 1:
            return
        if self.group_size < 2:
            c.add("group_size", "must be at least 2: a group's preferred and dispreferred samples are compared",
                  "set group_size=4 or more (the paper: 24)")
            return
        for name in ("train_batch_size", "sample_batch_size"):
            if getattr(self, name) % self.group_size:
                c.add(name, f"is not a multiple of group_size={self.group_size} (DGPO's loss needs whole groups)",
                      f"set {name} to a multiple of {self.group_size}")
