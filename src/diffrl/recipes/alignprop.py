"""AlignPropTrainer: reward backpropagation through the sampling chain (Prabhudesai et al. 2023), with DRaFT
(Clark et al. 2023) and ReFL (Xu et al. 2023) truncation.

Each micro-batch is sampled with gradients through the steps the truncation plan picks
(:mod:`diffrl.algorithms.truncation`; the policy executes the plan) and through the VAE decoder, scored by a
differentiable reward, and backpropagated; then one optimizer step per epoch. The loss is
``-reward_coefficient * reward`` (TRL hard-coded ``10 - reward``: the same gradient for a coefficient of 1); the
random truncation point is drawn from a seeded generator, so a resumed run is the uninterrupted one. The run
around the epoch is :class:`~diffrl.recipes.lifecycle.Trainer`'s.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from diffrl.algorithms.truncation import GradientPlan, plan_gradients
from diffrl.config import AlignPropConfig
from diffrl.recipes.checkpoints import is_sharded
from diffrl.recipes.lifecycle import EpochResult, Timer, Trainer, call_image_hook
from diffrl.recipes.optim import average_gradients
from diffrl.recipes.samples import chain_chunk, cycled_negatives
from diffrl.rewards import require_differentiable, score
from diffrl.seeding import SAMPLE_NOISE, generator_for

__all__ = ["AlignPropTrainer"]


class AlignPropTrainer(Trainer):
    """``AlignPropTrainer(config, reward_function, prompt_function, sd_pipeline, image_samples_hook=None)``, as in TRL.

    ``config.truncation_strategy`` picks the steps that carry gradients: TRL's ``"fixed"`` and ``"random"``,
    ``"draft_k"``, ``"draft_lv"`` or ``"refl"``. The image hook is called as
    ``hook({"images", "prompts", "prompt_metadata", "rewards"}, global_step, tracker)`` with the last chain of every
    ``log_image_freq``-th step (its last micro-batch, or all the micro-batches that shared the chain; see
    ``train_micro_batch_chunk``) and the first tracker, or ``None``.
    """

    trainer_name = "AlignProp"
    config_class = AlignPropConfig

    def __init__(self, config: AlignPropConfig, reward_function: Callable, prompt_function: Callable,
                 sd_pipeline: Any, image_samples_hook: Callable | None = None) -> None:
        self.negative_prompts = config.negative_prompt_list if isinstance(config, AlignPropConfig) else []
        self.last_plan: GradientPlan | None = None
        super().__init__(config, reward_function, prompt_function, sd_pipeline, image_samples_hook)

    def check_inputs(self) -> None:
        require_differentiable(self.reward_fn)

    def prepare(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        # Under FSDP/DeepSpeed the UNet is prepared with its optimizer (sharding needs the module; they reduce the
        # gradients themselves). Otherwise it stays unwrapped (no DDP): reward backprop calls it several times per
        # backward pass, so the gradients are averaged explicitly (optim.average_gradients).
        if is_sharded(self.accelerator):
            return super().prepare(optimizer)
        return self.accelerator.prepare(optimizer)

    # ------------------------------------------------------------------ the epoch
    def run_epoch(self, epoch: int, global_step: int) -> EpochResult:
        """``train_gradient_accumulation_steps`` micro-batches, one optimizer step.

        Micro-batch ``m`` draws its truncation plan from its own generator and sample ``j`` of it its noise from
        another, so consecutive micro-batches with equal plans can share one chain (:meth:`_micro_batch_chunk`)
        and give the same images and gradient: the loss of a chain of ``G`` micro-batches is the mean over its
        ``G * B`` images, and ``backward(loss * G / accumulate)`` accumulates exactly
        ``sum_m backward(loss_m / accumulate)``.
        """
        c, acc = self.config, self.accelerator
        timer = Timer()
        accumulate = c.train_gradient_accumulation_steps
        plans = [self.gradient_plan(generator_for(c.seed, epoch, acc.process_index, m)) for m in range(accumulate)]
        chains = group_equal_plans(plans, self._micro_batch_chunk())
        rewards, losses = [], []
        forward_s = backward_s = 0.0
        self.policy.unet.train()
        for i, group in enumerate(tqdm(chains, desc=f"epoch {epoch}: sampling with gradients",
                                       disable=not acc.is_local_main_process, leave=False)):
            with torch.enable_grad():
                pairs = self._sample_micro_batches(epoch, group, plans[group[0]])
                self.guard.check_samples({"images": pairs["images"]}, epoch, global_step, c.train_learning_rate)
                pairs["rewards"] = self.compute_rewards(pairs)
                loss = self.calculate_loss(pairs["rewards"])
                forward_s += timer.lap()
                self.backward(loss * (len(group) / accumulate), sync=i == len(chains) - 1)
            backward_s += timer.lap()
            pairs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in pairs.items()}
            rewards.append(pairs["rewards"])
            losses += [loss.detach()] * len(group)  # the chain's loss is its micro-batches' mean loss
        if not is_sharded(acc):
            average_gradients(acc, self._params)
        stats: dict[str, list[torch.Tensor]] = {}
        global_step = self.optimizer_update(epoch, global_step, stats)
        self.policy.unet.eval()
        train_s = timer.lap()
        if global_step % c.log_image_freq == 0:
            call_image_hook(self.image_samples_callback, pairs, global_step, acc)
        all_rewards = acc.gather(torch.cat(rewards).to(acc.device)).float().cpu().numpy()
        metrics = {"reward/mean": float(all_rewards.mean()), "reward/std": float(all_rewards.std()),
                   "reward/max": float(all_rewards.max()), "reward/min": float(all_rewards.min()),
                   "loss/reward": float(acc.reduce(torch.stack(losses).mean().to(acc.device), "mean")),
                   "stats/grad_norm": float(stats["stats/grad_norm"][0]),
                   "truncation/grad_steps": float(np.mean([p.num_grad_steps for p in plans])),
                   "truncation/first_grad_step": float(np.mean([p.first_grad_step for p in plans])),
                   "perf/sampling_s": forward_s, "perf/backward_s": backward_s,
                   "perf/epoch_s": forward_s + backward_s + train_s,
                   "perf/samples_per_s": c.train_batch_size * accumulate * acc.num_processes
                   / max(1e-9, forward_s + backward_s + train_s)}
        self.last_plan = plans[-1]
        return EpochResult(global_step, metrics, len(all_rewards))

    def _micro_batch_chunk(self) -> int:
        """Micro-batches per chain at most: ``train_micro_batch_chunk``, or (0) all of them on the CPU and one on
        an accelerator or under FSDP/DeepSpeed, where accumulation is what keeps a step inside memory."""
        c, acc = self.config, self.accelerator
        return chain_chunk(c.train_micro_batch_chunk, c.train_gradient_accumulation_steps,
                           acc.device.type == "cpu" and not is_sharded(acc))

    def _sample_micro_batches(self, epoch: int, group: Sequence[int], plan: GradientPlan) -> dict[str, Any]:
        """The micro-batches ``group`` (equal ``plan``) sampled as one chain with gradients, as
        :meth:`_generate_samples` returns them; each sample's noise comes from its own seeded generator, so the
        images do not depend on how micro-batches are grouped."""
        c, acc = self.config, self.accelerator
        prompts, metadata, generators = [], [], []
        for m in group:
            for j in range(c.train_batch_size):
                prompt, meta = self.prompt_fn()
                prompts.append(prompt)
                metadata.append(meta)
                generators.append(generator_for(c.seed, epoch, SAMPLE_NOISE, acc.process_index, m, j))
        kwargs = self._sample_kwargs(c.train_batch_size, generators, batches=len(group))
        images = self.policy.sample_for_plan(prompts, plan, gradient_checkpointing=c.gradient_checkpointing,
                                             **kwargs)
        draws = max(1, plan.renoise_draws)
        return {"images": images, "prompts": prompts * draws, "prompt_metadata": metadata * draws}

    # ------------------------------------------------------------------ sampling, rewards, loss (TRL's names)
    def _generate_samples(self, batch_size: int, with_grad: bool = True, prompts: Sequence[str] | None = None, *,
                          generator: torch.Generator | None = None) -> dict[str, Any]:
        """Sample ``batch_size`` images: ``{"images": [B', 3, H, W], "prompts", "prompt_metadata"}``.

        With gradients, the truncation strategy's plan for this batch (kept in :attr:`last_plan`) decides which
        steps carry them; DRaFT-LV returns ``B' = draft_lv_draws * B`` images (prompts repeated, draw-major).
        ``generator`` drives the plan's random choice and all sampling noise (default: seeded from torch's
        global RNG).
        """
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        if prompts is None:
            prompts, prompt_metadata = zip(*[self.prompt_fn() for _ in range(batch_size)])
        else:
            prompt_metadata = [{} for _ in prompts]
        prompts, prompt_metadata = list(prompts), list(prompt_metadata)
        kwargs = self._sample_kwargs(len(prompts), generator)
        if not with_grad:
            with torch.no_grad():
                images = self.policy.sample(prompts, **kwargs).trajectory.images
            return {"images": images, "prompts": prompts, "prompt_metadata": prompt_metadata}
        plan = self.gradient_plan(generator)
        self.last_plan = plan
        images = self.policy.sample_for_plan(prompts, plan, gradient_checkpointing=self.config.gradient_checkpointing,
                                             **kwargs)
        draws = max(1, plan.renoise_draws)
        return {"images": images, "prompts": prompts * draws, "prompt_metadata": prompt_metadata * draws}

    def gradient_plan(self, generator: torch.Generator | None) -> GradientPlan:
        """The configured truncation strategy's plan for one batch."""
        c = self.config
        return plan_gradients(c.truncation_strategy, c.sample_num_steps, generator,
                              start=c.truncated_backprop_timestep, minmax=tuple(c.truncated_rand_backprop_minmax),
                              k=c.draft_k, draws=c.draft_lv_draws, refl_range=(c.refl_min_step, c.refl_max_step))

    def _sample_kwargs(self, batch_size: int, generator: torch.Generator | list[torch.Generator],
                       batches: int = 1) -> dict[str, Any]:
        """``policy.sample`` keywords for ``batches`` batches of ``batch_size`` drawn as one chain."""
        c = self.config
        return dict(batch_size=batch_size * batches, num_inference_steps=c.sample_num_steps,
                    guidance_scale=c.sample_guidance_scale, eta=c.sample_eta,
                    negative_prompts=cycled_negatives(self.negative_prompts, batch_size, batches),
                    generator=generator, height=c.sample_height, width=c.sample_width)

    def compute_rewards(self, prompt_image_pairs: dict[str, Any]) -> torch.Tensor:
        """Score ``prompt_image_pairs`` (TRL's method): rewards ``[B']`` attached to the graph; a reward that
        returns values without gradients is an error that names it."""
        rewards, _ = score(self.reward_fn, prompt_image_pairs["images"], prompt_image_pairs["prompts"],
                           prompt_image_pairs["prompt_metadata"], keep_grad=True)
        return rewards

    def calculate_loss(self, rewards: torch.Tensor) -> torch.Tensor:
        """``-reward_coefficient * mean(rewards)``: maximise the reward."""
        return -self.config.reward_coefficient * rewards.mean()

    def loss(self, rewards: torch.Tensor) -> torch.Tensor:
        """TRL's name for :meth:`calculate_loss`."""
        return self.calculate_loss(rewards)


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
