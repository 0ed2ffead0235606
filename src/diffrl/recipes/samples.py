"""What an epoch samples: scored batches, the sample store and its reshuffling for training, gathering over
processes, and the one rule for negative prompts."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch

from diffrl.pipelines.types import TextConditioning, Trajectory


class ScoredBatch(NamedTuple):
    """One sampled and scored batch of ``B`` samples.

    Attributes:
        samples: what the recipe trains on: a :class:`~diffrl.pipelines.types.Trajectory`, or the ``[B, C, h, w]``
            final samples.
        images: ``[B, 3, H, W]`` in ``[0, 1]``, what the reward scored.
        prompts, prompt_metadata: ``B`` each, from the prompt function.
        rewards: ``[B]`` float32; ``reward_metadata``: what the reward returned beside them.
    """

    samples: Any
    images: torch.Tensor
    prompts: list[str]
    prompt_metadata: list[Any]
    rewards: torch.Tensor
    reward_metadata: Any

    def hook_row(self) -> list:
        """TRL's image-hook row: ``[images, prompts, prompt_metadata, rewards, reward_metadata]``."""
        return [self.images, list(self.prompts), list(self.prompt_metadata), self.rewards, self.reward_metadata]


def gather_rewards(accelerator: Any, rewards: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[P * n]`` the rewards of every process (this process's ``n`` concatenated first), float32 on the CPU."""
    local = torch.cat([r.detach().float() for r in rewards])
    if accelerator.num_processes == 1:
        return local.cpu()
    return accelerator.gather(local.to(accelerator.device)).cpu()


class EpochSamples(NamedTuple):
    """Every trajectory sampled by this process in one epoch (``B`` samples, ``N`` steps).

    Attributes:
        latents: ``[B, N, *S]`` ``x_t`` of each transition.
        next_latents: ``[B, N, *S]`` the ``x_t'`` it led to.
        final: ``[B, *S]`` the chain's end ``x_0`` (RWR regresses onto it).
        timesteps, prev_timesteps: ``[B, N]``.
        log_probs: ``[B, N]`` log-probabilities under the sampling weights.
        conditioning: text states (``[B, L, D]`` each) or ``None`` for unconditional models.
        means: ``[B, N, *S]`` each transition's mean under the sampling weights, when recorded; else ``None``.
    """

    latents: torch.Tensor
    next_latents: torch.Tensor
    final: torch.Tensor
    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    log_probs: torch.Tensor
    conditioning: TextConditioning | None
    means: torch.Tensor | None = None

    @classmethod
    def from_trajectories(cls, trajectories: list[Trajectory]) -> "EpochSamples":
        lat = torch.cat([t.latents for t in trajectories])
        cond = None
        if trajectories[0].conditioning is not None:
            cond = type(trajectories[0].conditioning).concat([t.conditioning for t in trajectories])
        means = None if any(t.means is None for t in trajectories) else torch.cat([t.means for t in trajectories])
        return cls(lat[:, :-1], lat[:, 1:], lat[:, -1], torch.cat([t.timesteps for t in trajectories]),
                   torch.cat([t.prev_timesteps for t in trajectories]), torch.cat([t.log_probs for t in trajectories]),
                   cond, means)

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
                           per_step(self.timesteps), per_step(self.prev_timesteps), per_step(self.log_probs), cond,
                           None if self.means is None else per_step(self.means))
        return out, perm


def training_conditioning(samples: EpochSamples, idx: slice, train_cfg: bool, guidance_scale: float):
    """The stored conditioning of ``idx`` and the guidance scale to train with (guided only with ``train_cfg``)."""
    if samples.conditioning is None:
        return None, 1.0
    cond = samples.conditioning.index(idx)
    if train_cfg and cond.negative_prompt_embeds is not None:
        return cond, guidance_scale
    return cond.without_guidance(), 1.0


def cycled_negatives(negative_prompts: Sequence[str], batch_size: int, batches: int = 1) -> list[str] | None:
    """The one rule for negative prompts, every trainer's: one per sample, the configured ones in turn within each
    batch of ``batch_size`` (as TRL assigned them), for ``batches`` batches drawn together; ``None`` when there are
    none (sampling then guides against the empty prompt)."""
    if not negative_prompts:
        return None
    return [negative_prompts[i % len(negative_prompts)] for i in range(batch_size)] * batches


def chain_chunk(asked: int, total: int, fuse_by_default: bool) -> int:
    """How many batches one sampling chain takes: ``asked`` (at most ``total``), or with ``asked == 0``
    (automatic) all ``total`` when ``fuse_by_default``, else one."""
    if asked:
        return min(asked, total)
    return total if fuse_by_default else 1
