"""AWMTrainer: Advantage Weighted Matching (Xue et al. 2025), the model's own denoising loss weighted by advantages.

One epoch is DiffusionNFT's (:mod:`diffrl.recipes.nft`): the old policy (by default the weights of this epoch, so
sampling is on-policy) draws clean samples with any solver, they are scored, group advantages are computed (clipped
to ``train_adv_clip_max``), then each sample is trained at fresh timesteps with fresh noise on
:func:`diffrl.algorithms.awm.awm_loss`: ``A * w(||f_theta(x_t, t) - target||^2)`` in the model's own prediction
space (noise, velocity or ``x0``), optionally PPO-clipped against the sampling policy and pulled towards it
(``awm_kl_old_coef``) and towards the reference (``nft_kl_coef``). Only the loss and the advantage signal differ
from NFT; sampling, the old policy's EMA, checkpoints and resume are NFT's.
"""

from __future__ import annotations

import torch

from diffrl.algorithms import prediction_kl
from diffrl.algorithms.awm import AWMStats, awm_loss, matching_loss, weighted_matching
from diffrl.recipes.nft import NFTRecipe, NFTSamples

__all__ = ["AWMRecipe"]


class AWMRecipe(NFTRecipe):
    """AWM on any policy (see the module docstring). ``NFTSamples.r`` holds each sample's clipped advantage."""

    def signal(self, advantages: torch.Tensor) -> torch.Tensor:
        """AWM weights each sample by its clipped group advantage itself (not NFT's optimality)."""
        return advantages

    def signal_stats(self, samples: NFTSamples) -> dict[str, float]:
        """The epoch's mean absolute advantage (the advantages of a group average to 0)."""
        return {"stats/adv_abs_mean": float(samples.r.abs().mean())}

    def loss(self, call: tuple[NFTSamples, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, list[dict]]:
        loss, st = self.compute_awm_loss(*call)
        return loss, [{"loss/policy": st.policy_loss, "stats/matching": st.matching, "stats/ratio": st.ratio,
                       "stats/clipfrac": st.clipfrac, "stats/kl_old": st.kl_old, "stats/kl_ref": st.kl_ref}]

    def compute_awm_loss(self, batch: NFTSamples, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                   AWMStats]:
        """The AWM loss of one minibatch at per-sample timesteps ``t`` with ``noise``: the trained weights' output
        (with gradients), the sampling policy's (for the ratio and ``kl_old``) and the reference's (for
        ``kl_ref``), all unguided, on ``x_t`` of the forward process."""
        c, policy = self.config, self.policy
        x_t, target = policy.schedule.training_pair(batch.x0, noise, t)
        out = policy.predict(x_t, t, batch.conditioning, 1.0)
        matching = matching_loss(out, target)
        w_theta = weighted_matching(matching, c.awm_weighting, c.awm_ghuber_power)
        with torch.no_grad():
            out_old = policy.predict(x_t, t, batch.conditioning, 1.0, params=self.old_params())
            w_old = weighted_matching(matching_loss(out_old, target), c.awm_weighting, c.awm_ghuber_power)
            out_ref = (policy.predict(x_t, t, batch.conditioning, 1.0, params=policy.reference_params())
                       if c.nft_kl_coef > 0 else None)
        kl_old = prediction_kl(out, out_old) if c.awm_kl_old_coef > 0 else None
        kl_ref = prediction_kl(out, out_ref) if out_ref is not None else None
        return awm_loss(w_theta, w_old, batch.r, c.awm_clip_range, kl_old=kl_old, kl_old_coef=c.awm_kl_old_coef,
                        kl_ref=kl_ref, kl_ref_coef=c.nft_kl_coef, matching=matching)
