"""Reward backpropagation through the sampling chain: AlignProp (Prabhudesai et al. 2023), with DRaFT
(Clark et al. 2023) and ReFL (Xu et al. 2023) truncation.

Each micro-batch is sampled with gradients through the steps the truncation plan picks
(:mod:`diffrl.algorithms.truncation`; the policy executes the plan) and through the decoder, scored by a
differentiable reward, and backpropagated; then one optimizer step per epoch. The loss is
``-reward_coefficient * reward`` (TRL hard-coded ``10 - reward``: the same gradient for a coefficient of 1); the
truncation plans are drawn from seeded generators, so a resumed run is the uninterrupted one. The run around the
epoch is the :class:`~diffrl.recipes.trainer.Trainer`'s; TRL's method names are in :mod:`diffrl.recipes.trainers`.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from diffrl.algorithms.truncation import GradientPlan, plan_gradients
from diffrl.recipes.checkpoints import is_sharded
from diffrl.recipes.epoch import EpochResult, Timer, Timings
from diffrl.recipes.recipe import RecipeBase
from diffrl.recipes.run import Run
from diffrl.recipes.samples import chain_chunk, cycled_negatives, gather_rewards
from diffrl.recipes.update import MicroStep, UpdateLoop
from diffrl.rewards import require_differentiable, score
from diffrl.seeding import Stream, generator_for

__all__ = ["AlignPropRecipe", "group_equal_plans"]


class AlignPropRecipe(RecipeBase):
    """Reward backpropagation (see the module docstring). ``config.truncation_strategy`` picks the steps that carry
    gradients: TRL's ``"fixed"`` and ``"random"``, ``"draft_k"``, ``"draft_lv"`` or ``"refl"``. The image hook is
    called with the last chain of every ``log_image_freq``-th step (its last micro-batch, or all the micro-batches
    that shared the chain; see ``train_micro_batch_chunk``)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        require_differentiable(self.reward_fn)
        self.last_plan: GradientPlan | None = None

    def setup(self, run: Run) -> None:
        # Unsharded, the model stays unwrapped (no DDP): reward backprop calls it several times per backward pass,
        # so the update loop averages the gradients explicitly (optim.average_gradients).
        self.run = run
        self.update = UpdateLoop(run.accelerator, self.policy, self.config, run.guard,
                                 total_steps=self.config.num_epochs, backward_calls=self.config.train_gradient_accumulation_steps,
                                 wrap=False)

    # ------------------------------------------------------------------ the epoch
    def run_epoch(self, epoch: int, global_step: int) -> EpochResult:
        """``train_gradient_accumulation_steps`` micro-batches, one optimizer step.

        Micro-batch ``m`` draws its truncation plan from its own generator and sample ``j`` of it its noise from
        another, so consecutive micro-batches with equal plans can share one chain (:meth:`micro_batch_chunk`)
        and give the same images and gradient: the loss of a chain of ``G`` micro-batches is the mean over its
        ``G * B`` images, a micro-step of size ``G`` for the update loop.
        """
        c, acc = self.config, self.run.accelerator
        timer = Timer()
        accumulate = c.train_gradient_accumulation_steps
        plans = [self.gradient_plan(generator_for(Stream.PLAN, c.seed, epoch, acc.process_index, m))
                 for m in range(accumulate)]
        chains = group_equal_plans(plans, self.micro_batch_chunk())
        rewards: list[torch.Tensor] = []
        metadata: list[Any] = []
        last: dict[str, Any] = {}
        sampling_s = 0.0

        def chain_loss(group: list[int]) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
            nonlocal sampling_s, last
            started = time.perf_counter()
            with torch.enable_grad():
                pairs = self.sample_micro_batches(epoch, group, plans[group[0]])
                self.run.check_samples({"images": pairs["images"]}, epoch, global_step)
                pairs["rewards"], reward_metadata = self.score_images(pairs, with_metadata=True)
                loss = self.reward_loss(pairs["rewards"])
            last = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in pairs.items()}
            rewards.append(last["rewards"])
            metadata.append(reward_metadata)
            sampling_s += time.perf_counter() - started
            return loss, [{"loss/reward": loss.detach()}] * len(group)  # a chain's loss is its micro-batches' mean

        calls: Iterator[MicroStep] = (MicroStep(len(group), group) for group in chains)
        stats: dict[str, list[torch.Tensor]] = {}
        global_step = self.update.run(calls, chain_loss, per_update=accumulate, epoch=epoch, global_step=global_step,
                                      stats=stats, desc=f"epoch {epoch}: sampling with gradients", total=len(chains))
        training_s = timer.lap() - sampling_s
        if global_step % c.log_image_freq == 0:
            self.run.show_images(last, global_step)
        extra = {"truncation/grad_steps": float(np.mean([p.num_grad_steps for p in plans])),
                 "truncation/first_grad_step": float(np.mean([p.first_grad_step for p in plans]))}
        self.last_plan = plans[-1]
        return EpochResult(global_step, gather_rewards(acc, rewards), Timings(sampling_s, 0.0, training_s), stats,
                           extra, tuple(metadata))

    def micro_batch_chunk(self) -> int:
        """Micro-batches per chain at most: ``train_micro_batch_chunk``, or (0) all of them on the CPU and one on
        an accelerator or under FSDP/DeepSpeed, where accumulation is what keeps a step inside memory."""
        c, acc = self.config, self.run.accelerator
        return chain_chunk(c.train_micro_batch_chunk, c.train_gradient_accumulation_steps,
                           acc.device.type == "cpu" and not is_sharded(acc))

    def sample_micro_batches(self, epoch: int, group: Sequence[int], plan: GradientPlan) -> dict[str, Any]:
        """The micro-batches ``group`` (equal ``plan``) sampled as one chain with gradients, as
        :meth:`~diffrl.recipes.trainers.AlignPropTrainer._generate_samples` returns them; each sample's noise comes from its own seeded generator, so the
        images do not depend on how micro-batches are grouped."""
        c, acc = self.config, self.run.accelerator
        prompts, metadata, generators = [], [], []
        for m in group:
            for j in range(c.train_batch_size):
                prompt, meta = self.prompt_fn()
                prompts.append(prompt)
                metadata.append(meta)
                generators.append(generator_for(Stream.SAMPLE_NOISE, c.seed, epoch, acc.process_index, m, j))
        kwargs = self.sample_kwargs(c.train_batch_size, generators, batches=len(group))
        images = self.policy.sample_for_plan(prompts, plan, gradient_checkpointing=c.gradient_checkpointing,
                                             **kwargs)
        draws = max(1, plan.renoise_draws)
        return {"images": images, "prompts": prompts * draws, "prompt_metadata": metadata * draws}

    # ------------------------------------------------------------------ plans, sampling, rewards, loss
    def gradient_plan(self, generator: torch.Generator | None) -> GradientPlan:
        """The configured truncation strategy's plan for one batch."""
        c = self.config
        return plan_gradients(c.truncation_strategy, c.sample_num_steps, generator,
                              start=c.truncated_backprop_timestep, minmax=tuple(c.truncated_rand_backprop_minmax),
                              k=c.draft_k, draws=c.draft_lv_draws, refl_range=(c.refl_min_step, c.refl_max_step))

    def sample_kwargs(self, batch_size: int, generator: torch.Generator | list[torch.Generator],
                       batches: int = 1) -> dict[str, Any]:
        """``policy.sample`` keywords for ``batches`` batches of ``batch_size`` drawn as one chain."""
        c = self.config
        return dict(batch_size=batch_size * batches, num_inference_steps=c.sample_num_steps,
                    guidance_scale=c.sample_guidance_scale, eta=c.sample_eta,
                    negative_prompts=cycled_negatives(c.negative_prompt_list, batch_size, batches),
                    generator=generator, height=c.sample_height, width=c.sample_width)

    def score_images(self, prompt_image_pairs: dict[str, Any], with_metadata: bool = False):
        """Score ``prompt_image_pairs``: rewards ``[B']`` attached to the graph (and the reward's metadata when
        ``with_metadata``); a reward that returns values without gradients is an error that names it."""
        rewards, metadata = score(self.reward_fn, prompt_image_pairs["images"], prompt_image_pairs["prompts"],
                                  prompt_image_pairs["prompt_metadata"], keep_grad=True)
        return (rewards, metadata) if with_metadata else rewards

    def reward_loss(self, rewards: torch.Tensor) -> torch.Tensor:
        """``-reward_coefficient * mean(rewards)``: maximise the reward."""
        return -self.config.reward_coefficient * rewards.mean()


def group_equal_plans(plans: Sequence[GradientPlan], chunk: int) -> list[list[int]]:
    """Consecutive micro-batch indices in groups of at most ``chunk`` whose plans are equal (each group is one
    chain): ``[A, A, B, A]`` with ``chunk=4`` gives ``[[0, 1], [2], [3]]``."""
    groups: list[list[int]] = []
    for m, plan in enumerate(plans):
        if groups and len(groups[-1]) < chunk and plans[groups[-1][0]] == plan:
            groups[-1].append(m)
        else:
            groups.append([m])
    return groups
