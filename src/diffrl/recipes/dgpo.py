"""DGPOTrainer: Direct Group Preference Optimization (Luo et al., ICLR 2026) on any policy.

One epoch is DiffusionNFT's sampling (:mod:`diffrl.recipes.nft`: clean samples from any solver, deterministic ODE by
default, scored, group advantages clipped to ``train_adv_clip_max``). Training differs: groups, not samples, are
shuffled, a minibatch holds ``train_batch_size / group_size`` whole groups, and each group is noised at one timestep
with one noise per draw; the loss is :func:`diffrl.algorithms.dgpo.dgpo_loss` on the trained model's and the
reference's denoising losses there (the frozen model, or the old policy with ``dgpo_reference: old``), plus NFT's
reference KL (``nft_kl_coef``).
"""

from __future__ import annotations

from typing import Iterator

import torch

from diffrl.algorithms import prediction_kl, sample_train_timesteps
from diffrl.algorithms.awm import matching_loss
from diffrl.algorithms.dgpo import DGPOStats, dgpo_loss
from diffrl.recipes.awm import AWMRecipe
from diffrl.recipes.nft import NFTSamples
from diffrl.recipes.update import MicroStep
from diffrl.seeding import Stream, generator_for

__all__ = ["DGPORecipe"]


class DGPORecipe(AWMRecipe):
    """DGPO on any policy (see the module docstring). ``NFTSamples.r`` holds each sample's clipped advantage."""

    def uses_reference(self) -> bool:
        """The implicit rewards are relative to the frozen model unless ``dgpo_reference: old``; the KL term too."""
        return self.config.dgpo_reference == "frozen" or super().uses_reference()

    def train_inner(self, samples: NFTSamples, epoch: int, inner: int, global_step: int,
                    stats: dict[str, list[torch.Tensor]]) -> int:
        """One pass over the shuffled groups: each minibatch of whole groups at each of its groups' drawn timesteps,
        with one fresh noise per group and draw."""
        c = self.config
        g = c.group_size
        generator = generator_for(Stream.SHUFFLE, c.seed, epoch, inner, self.run.accelerator.process_index)
        n = samples.x0.shape[0]
        groups = n // g
        order = torch.randperm(groups, generator=generator)
        timesteps = sample_train_timesteps(self.train_timestep_grid(), groups, fraction=c.train_timestep_fraction,
                                           generator=generator).to(samples.x0.device)
        k = timesteps.shape[1]
        per_batch = c.train_batch_size // g

        def calls() -> Iterator[MicroStep]:
            for start in range(0, groups, per_batch):
                chosen = order[start:start + per_batch]
                idx = (chosen[:, None] * g + torch.arange(g)).flatten().to(samples.x0.device)
                batch = samples.index(idx)
                for j in range(k):
                    t = timesteps[chosen.to(timesteps.device), j].repeat_interleave(g)
                    noise = torch.randn((len(chosen), *batch.x0.shape[1:]), generator=generator)
                    yield MicroStep(1, (batch, t, noise.repeat_interleave(g, dim=0).to(batch.x0.device)))

        return self.update.run(calls(), self.loss, per_update=c.train_gradient_accumulation_steps * k, epoch=epoch,
                               global_step=global_step, stats=stats, desc=f"epoch {epoch}.{inner}: training")

    def loss(self, call: tuple[NFTSamples, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, list[dict]]:
        loss, st = self.compute_dgpo_loss(*call)
        return loss, [{"loss/policy": st.policy_loss, "stats/group_weight": st.group_weight,
                       "stats/margin": st.margin, "stats/matching": st.matching, "stats/kl_ref": st.kl_ref}]

    def compute_dgpo_loss(self, batch: NFTSamples, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                     DGPOStats]:
        """The DGPO loss of one minibatch of whole groups at per-sample timesteps ``t`` with ``noise`` (both equal
        within a group): the trained weights' denoising loss (with gradients) against the reference's, unguided."""
        c, policy = self.config, self.policy
        x_t, target = policy.schedule.training_pair(batch.x0, noise, t)
        out = policy.predict(x_t, t, batch.conditioning, 1.0)
        frozen = policy.reference_params() if c.dgpo_reference == "frozen" or c.nft_kl_coef > 0 else None
        with torch.no_grad():
            ref_params = frozen if c.dgpo_reference == "frozen" else self.old_params()
            out_ref = policy.predict(x_t, t, batch.conditioning, 1.0, params=ref_params)
            out_frozen = out_ref if c.dgpo_reference == "frozen" or frozen is None else \
                policy.predict(x_t, t, batch.conditioning, 1.0, params=frozen)
        kl = prediction_kl(out, out_frozen) if c.nft_kl_coef > 0 else None
        return dgpo_loss(matching_loss(out, target), matching_loss(out_ref, target), batch.r, c.group_size,
                         c.dgpo_beta, kl=kl, kl_coef=c.nft_kl_coef)
