"""The sample store of one epoch and its reshuffling for training."""

from __future__ import annotations

from typing import NamedTuple

import torch

from diffrl.pipelines.types import TextConditioning, Trajectory


class EpochSamples(NamedTuple):
    """Every trajectory sampled by this process in one epoch (``B`` samples, ``N`` steps).

    Attributes:
        latents: ``[B, N, *S]`` ``x_t`` of each transition.
        next_latents: ``[B, N, *S]`` the ``x_t'`` it led to.
        final: ``[B, *S]`` the chain's end ``x_0`` (RWR regresses onto it).
        timesteps, prev_timesteps: ``[B, N]``.
        log_probs: ``[B, N]`` log-probabilities under the sampling weights.
        conditioning: text states (``[B, L, D]`` each) or ``None`` for unconditional models.
    """

    latents: torch.Tensor
    next_latents: torch.Tensor
    final: torch.Tensor
    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    log_probs: torch.Tensor
    conditioning: TextConditioning | None

    @classmethod
    def from_trajectories(cls, trajectories: list[Trajectory]) -> "EpochSamples":
        lat = torch.cat([t.latents for t in trajectories])
        cond = None
        if trajectories[0].conditioning is not None:
            cond = type(trajectories[0].conditioning).concat([t.conditioning for t in trajectories])
        return cls(lat[:, :-1], lat[:, 1:], lat[:, -1], torch.cat([t.timesteps for t in trajectories]),
                   torch.cat([t.prev_timesteps for t in trajectories]), torch.cat([t.log_probs for t in trajectories]),
                   cond)

    @property
    def size(self) -> int:
        return self.latents.shape[0]

    def shuffled(self, generator: torch.Generator) -> tuple["EpochSamples", torch.Tensor]:
        """Samples in a random order, and each sample's timesteps in their own random order (ddpo-pytorch's
        scheme: every training batch sees a mix of timesteps). Returns the samples and the sample permutation."""
        b, n = self.timesteps.shape
        perm = torch.randperm(b, generator=generator)
        steps = torch.stack([torch.randperm(n, generator=generator) for _ in range(b)]).to(self.timesteps.device)

        def per_step(x: torch.Tensor) -> torch.Tensor:
            x = x[perm.to(x.device)]
            index = steps.reshape(b, n, *([1] * (x.ndim - 2))).expand_as(x)
            return torch.gather(x, 1, index)

        cond = self.conditioning.index(perm.to(self.conditioning.prompt_embeds.device)) if self.conditioning else None
        out = EpochSamples(per_step(self.latents), per_step(self.next_latents), self.final[perm.to(self.final.device)],
                           per_step(self.timesteps), per_step(self.prev_timesteps), per_step(self.log_probs), cond)
        return out, perm


def training_conditioning(samples: EpochSamples, idx: slice, train_cfg: bool, guidance_scale: float):
    """The stored conditioning of ``idx`` and the guidance scale to train with (guided only with ``train_cfg``)."""
    if samples.conditioning is None:
        return None, 1.0
    cond = samples.conditioning.index(idx)
    if train_cfg and cond.negative_prompt_embeds is not None:
        return cond, guidance_scale
    return cond.without_guidance(), 1.0


def cycled_negatives(negative_prompts: list[str], batch_size: int, batches: int = 1) -> list[str] | None:
    """One negative prompt per sample: the configured ones in turn within each batch of ``batch_size`` (as TRL
    assigned them), for ``batches`` batches drawn together; ``None`` when there are none."""
    if not negative_prompts:
        return None
    return [negative_prompts[i % len(negative_prompts)] for i in range(batch_size)] * batches


def chain_chunk(asked: int, total: int, fuse_by_default: bool) -> int:
    """How many batches one sampling chain takes: ``asked`` (at most ``total``), or with ``asked == 0``
    (automatic) all ``total`` when ``fuse_by_default``, else one."""
    if asked:
        return min(asked, total)
    return total if fuse_by_default else 1
