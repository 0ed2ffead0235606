"""AWMConfig: Advantage Weighted Matching (Xue et al. 2025, arXiv 2509.25050) on the forward-process fields.

It samples and trains as DiffusionNFT does (:class:`~diffrl.config.nft.ForwardProcessConfig`: ``nft_sampler``,
timesteps, the old policy's EMA, ``nft_kl_coef`` to the reference); only the loss differs
(:mod:`diffrl.algorithms.awm`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from diffrl.config._base import APPLY, Checks, option
from diffrl.config.nft import EMAScheduleName, ForwardProcessConfig
from diffrl.config.resume import OBJECTIVE

__all__ = ["AWMConfig", "AWMWeightingName"]

AWMWeightingName = Literal["uniform", "ghuber"]


@dataclasses.dataclass
class AWMConfig(ForwardProcessConfig):
    """Configuration of ``AWMTrainer``: the epoch of :class:`~diffrl.config.nft.ForwardProcessConfig`, trained with
    the advantage-weighted denoising loss. By default the old policy is the one that sampled the epoch
    (``nft_ema_schedule: none``: sampling is on-policy, as in the paper); an EMA schedule makes it off-policy."""

    nft_ema_schedule: EMAScheduleName = option(
        "none", trl=False, resume=OBJECTIVE,
        help="Decay of the old (sampling) policy's EMA by optimizer step: 'none' (the current weights sample each "
             "epoch: on-policy, AWM's default), 'linear' or 'warm_start' (NFT's off-policy schedules).")
    train_adv_clip_max: float = option(5.0, trl=False, resume=APPLY,
                                       help="Advantages are clipped to [-train_adv_clip_max, train_adv_clip_max].")
    awm_weighting: AWMWeightingName = option(
        "uniform", trl=False, resume=OBJECTIVE,
        help="w(l) applied to each sample's denoising loss l before the advantage: 'uniform' (l) or 'ghuber' "
             "(((l + 1e-3)^p - 1e-3^p) / p with p = awm_ghuber_power: damps large errors).")
    awm_ghuber_power: float = option(0.25, trl=False, resume=OBJECTIVE, help="p of the ghuber weighting, in (0, 1].")
    awm_clip_range: float = option(
        0.0, trl=False, resume=OBJECTIVE,
        help="PPO-style clip of the ratio exp(w(l_old) - w(l_theta)) against the sampling policy (0: the plain AWM "
             "loss; Flow-Factory suggests 1e-5 on SD3.5).")
    awm_kl_old_coef: float = option(
        0.0, trl=False, resume=OBJECTIVE,
        help="Weight of ||f_theta - f_old||^2, the raw outputs' squared distance to the old (sampling or EMA) "
             "policy: a soft trust region.")

    def _check(self, c: Checks, num_processes: int, check_environment: bool) -> None:
        super()._check(c, num_processes, check_environment)
        c.at_least("awm_clip_range", 0.0)
        c.at_least("awm_kl_old_coef", 0.0)
        if c.ok("awm_ghuber_power") and not 0 < self.awm_ghuber_power <= 1:
            c.add("awm_ghuber_power", "must be in (0, 1]", "set awm_ghuber_power=0.25")
        c.unchanged_unless(self.awm_weighting == "ghuber", "awm_ghuber_power", f"with awm_weighting={self.awm_weighting!r}")
        if c.ok("awm_clip_range") and self.awm_clip_range >= 1:
            c.add("awm_clip_range", "clips the ratio to [1 - c, 1 + c] and must be below 1", "set awm_clip_range=1e-4")
