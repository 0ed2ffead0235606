"""AlignPropTrainer: reward backpropagation through sampling (AlignProp, DRaFT-K, DRaFT-LV, ReFL).

Each epoch is TRL 0.23's AlignProp step: ``train_gradient_accumulation_steps`` micro-batches of
``train_batch_size`` prompts are sampled with gradients through the steps the truncation strategy picks
(:mod:`diffrl.algorithms.truncation`) and through the VAE decoder, scored by a differentiable reward, and
backpropagated; then one optimizer step. Defects of TRL's trainer fixed here (see ``shared/REFERENCE.md``):
the loss is ``-reward_coefficient * reward`` instead of ``10 - reward``; saving, resume, the image hook and
several processes work as in :class:`~diffrl.recipes.ddpo.DDPOTrainer`; the random truncation point is drawn
from a seeded generator, so a resumed run is the uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from diffrl.algorithms.truncation import GradientPlan, plan_gradients
from diffrl.config import AlignPropConfig
from diffrl.pipelines.types import Trajectory
from diffrl.recipes import run
from diffrl.recipes.evaluation import PeriodicEvaluator
from diffrl.recipes.rewards import RewardError, reward_name, score

__all__ = ["AlignPropTrainer", "require_differentiable"]


def require_differentiable(reward_function: Callable) -> None:
    """Refuse a reward that declares ``differentiable = False`` (JPEG size, a remote server, ...): there is
    nothing to backpropagate. Callables without the attribute are accepted; their rewards are checked for a
    gradient when first scored."""
    if getattr(reward_function, "differentiable", None) is False:
        raise RewardError(
            f"reward '{reward_name(reward_function)}' declares differentiable=False, but AlignProp, DRaFT and ReFL "
            "backpropagate the reward into the model. Use a differentiable reward (computed with torch operations "
            "on the images), or train with DDPOTrainer, which needs only reward values.")


class AlignPropTrainer:
    """``AlignPropTrainer(config, reward_function, prompt_function, sd_pipeline, image_samples_hook=None)``, as in TRL.

    ``config.truncation_strategy`` picks the steps that carry gradients: TRL's ``"fixed"`` and ``"random"``,
    ``"draft_k"``, ``"draft_lv"`` or ``"refl"``. ``sd_pipeline`` is a TRL-style pipeline
    (:class:`~diffrl.DefaultDDPOStableDiffusionPipeline`, :class:`~diffrl.DefaultDDPODDPMPipeline`) or a policy.
    The image hook is called as ``hook({"images", "prompts", "prompt_metadata", "rewards"}, global_step, tracker)``
    with the last micro-batch of every ``log_image_freq``-th step and the first tracker, or ``None``.
    """

    def __init__(self, config: AlignPropConfig, reward_function: Callable, prompt_function: Callable, sd_pipeline: Any,
                 image_samples_hook: Callable | None = None) -> None:
        if not isinstance(config, AlignPropConfig):
            raise TypeError(f"AlignPropTrainer needs an AlignPropConfig, got {type(config).__name__}.")
        require_differentiable(reward_function)
        self.config = config
        self.reward_fn, self.prompt_fn = reward_function, prompt_function
        self.image_samples_callback = image_samples_hook
        self.sd_pipeline = sd_pipeline
        start = run.start_run(config, sd_pipeline)
        self.accelerator = acc = start.accelerator
        self.policy, self.run_name, self.run_dir = start.policy, start.run_name, start.run_dir
        self.checkpoints_dir, self.metrics = start.checkpoints_dir, start.metrics
        self._params = list(self.policy.trainable_parameters())
        optimizer = run.build_optimizer(config, self._params)
        self.lr_scheduler = run.build_lr_scheduler(config, optimizer, config.num_epochs)  # one step per epoch
        # The UNet stays unwrapped (no DDP): gradients are averaged explicitly, see run.average_gradients.
        self.optimizer = acc.prepare(optimizer)
        self.negative_prompts = config.negative_prompt_list
        self.evaluator = PeriodicEvaluator(config, self.policy, reward_function, prompt_function, self.run_dir, acc)
        self.first_epoch, self.global_step, self.last_metrics = 0, 0, {}
        self.last_plan: GradientPlan | None = None
        if start.resume is not None:
            state = run.load_checkpoint(acc, start.resume, self.policy, self.optimizer, self.lr_scheduler)
            self.first_epoch, self.global_step = int(state["epoch"]) + 1, int(state["global_step"])
            self.evaluator.load_state_dict(state.get("evaluation"))
            acc.print(f"resumed from {start.resume}: continuing at epoch {self.first_epoch}, "
                      f"global step {self.global_step}")

    # ------------------------------------------------------------------ loop
    def train(self, epochs: int | None = None) -> None:
        """Train from the first (or resumed) epoch up to ``epochs`` (default ``config.num_epochs``)."""
        last = epochs if epochs is not None else self.config.num_epochs
        for epoch in range(self.first_epoch, last):
            self.global_step = self.step(epoch, self.global_step)
        self.first_epoch = max(self.first_epoch, last)
        if self.config.log_with:
            self.accelerator.end_training()

    def step(self, epoch: int, global_step: int) -> int:
        """One epoch: ``train_gradient_accumulation_steps`` micro-batches, one optimizer step; returns the
        global step."""
        c, acc = self.config, self.accelerator
        timer = run.Timer()
        accumulate = c.train_gradient_accumulation_steps
        rewards, losses, plans = [], [], []
        forward_s = backward_s = 0.0
        self.policy.unet.train()
        for micro in range(accumulate):
            generator = run.generator_for(c.seed, epoch, acc.process_index, micro)
            with torch.enable_grad():
                pairs = self._generate_samples(c.train_batch_size, generator=generator)
                pairs["rewards"] = self.compute_rewards(pairs)
                loss = self.calculate_loss(pairs["rewards"])
                forward_s += timer.lap()
                acc.backward(loss / accumulate)
            backward_s += timer.lap()
            pairs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in pairs.items()}
            rewards.append(pairs["rewards"])
            losses.append(float(loss.detach()))
            plans.append(self.last_plan)
        run.average_gradients(acc, self._params)
        grad_norm = run.optimizer_step(acc, self._params, self.optimizer, self.lr_scheduler, c.train_max_grad_norm)
        global_step += 1
        self.policy.unet.eval()
        train_s = timer.lap()
        if global_step % c.log_image_freq == 0:
            run.call_image_hook(self.image_samples_callback, pairs, global_step, acc)
        all_rewards = acc.gather(torch.cat(rewards).to(acc.device)).float().cpu().numpy()
        metrics = {"epoch": epoch, "reward/mean": float(all_rewards.mean()), "reward/std": float(all_rewards.std()),
                   "reward/max": float(all_rewards.max()), "reward/min": float(all_rewards.min()),
                   "loss/reward": float(acc.reduce(torch.tensor(np.mean(losses), device=acc.device), "mean")),
                   "truncation/grad_steps": float(np.mean([p.num_grad_steps for p in plans])),
                   "truncation/first_grad_step": float(np.mean([p.first_grad_step for p in plans])),
                   "perf/sampling_s": forward_s, "perf/backward_s": backward_s,
                   "perf/epoch_s": forward_s + backward_s + train_s,
                   "perf/samples_per_s": c.train_batch_size * accumulate * acc.num_processes
                   / max(1e-9, forward_s + backward_s + train_s),
                   "train/lr": self.lr_scheduler.get_last_lr()[0]}
        if grad_norm is not None:
            metrics["stats/grad_norm"] = grad_norm
        metrics.update(run.peak_memory_metrics(acc.device))
        metrics.update(self.evaluator.maybe_run(epoch))
        self.last_metrics = metrics
        self.metrics.log(metrics, step=global_step)
        if run.is_checkpoint_epoch(c, epoch):
            state = {"global_step": global_step, "metrics": metrics, "evaluation": self.evaluator.state_dict()}
            run.save_checkpoint(acc, self.checkpoints_dir, epoch, c.num_checkpoint_limit, self.policy,
                                self.optimizer, self.lr_scheduler, state)
        return global_step

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
        if not with_grad:
            with torch.no_grad():
                images = self.policy.sample(prompts, **self._sample_kwargs(len(prompts), generator)).trajectory.images
            return {"images": images, "prompts": prompts, "prompt_metadata": prompt_metadata}
        plan = self.gradient_plan(generator)
        self.last_plan = plan
        images = self._sample_with_grad(prompts, plan, generator)
        draws = max(1, plan.renoise_draws)
        return {"images": images, "prompts": prompts * draws, "prompt_metadata": prompt_metadata * draws}

    def gradient_plan(self, generator: torch.Generator | None) -> GradientPlan:
        """The configured truncation strategy's plan for one batch."""
        c = self.config
        return plan_gradients(c.truncation_strategy, c.sample_num_steps, generator,
                              start=c.truncated_backprop_timestep, minmax=tuple(c.truncated_rand_backprop_minmax),
                              k=c.draft_k, draws=c.draft_lv_draws, refl_range=(c.refl_min_step, c.refl_max_step))

    def _sample_kwargs(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        c = self.config
        negatives = None
        if self.negative_prompts:
            negatives = [self.negative_prompts[i % len(self.negative_prompts)] for i in range(batch_size)]
        return dict(batch_size=batch_size, num_inference_steps=c.sample_num_steps,
                    guidance_scale=c.sample_guidance_scale, eta=c.sample_eta, negative_prompts=negatives,
                    generator=generator)

    def _sample_with_grad(self, prompts: list[str], plan: GradientPlan, generator: torch.Generator) -> torch.Tensor:
        """Differentiable images ``[B', 3, H, W]`` in ``[0, 1]`` for ``plan``."""
        kwargs = self._sample_kwargs(len(prompts), generator)
        if plan.renoise_draws:
            with torch.no_grad():
                trajectory = self.policy.sample(prompts, **kwargs).trajectory
            return self._draft_lv_images(trajectory, plan.renoise_draws, generator)
        result = self.policy.sample(prompts, grad_steps=plan.grad_steps, stop_after_step=plan.stop_after_step,
                                    gradient_checkpointing=self.config.gradient_checkpointing, **kwargs)
        return result.images_with_grad

    def _draft_lv_images(self, trajectory: Trajectory, draws: int, generator: torch.Generator) -> torch.Tensor:
        """DRaFT-LV's last step (Clark et al. 2023, Algorithm 2): re-noise the chain's ``x_0`` to the last step's
        timestep ``t`` ``draws`` times, ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (Ho et al. 2020,
        eq. 4), and denoise each with one sampler step whose UNet call carries gradients. Returns the
        ``draws * B`` decoded images, draw-major."""
        c, policy = self.config, self.policy
        x0 = trajectory.latents[:, -1]  # [B, C, h, w], no graph (the chain ran without gradients)
        batch = x0.shape[0]
        x0 = x0.repeat(draws, *([1] * (x0.ndim - 1)))
        t = trajectory.timesteps[:, -1].repeat(draws)
        t_prev = trajectory.prev_timesteps[:, -1].repeat(draws)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        x_t, _ = policy.schedule.training_pair(x0, eps, t)
        cond = trajectory.conditioning
        if cond is not None:
            cond = cond.index(torch.arange(batch, device=cond.prompt_embeds.device).repeat(draws))
        args = (x_t, t, cond, c.sample_guidance_scale)
        out = (checkpoint(policy.predict, *args, use_reentrant=False) if c.gradient_checkpointing
               else policy.predict(*args))
        step = policy.schedule.step(out, x_t, t, t_prev, eta=c.sample_eta, generator=generator, compute_log_prob=False)
        return policy.decode(step.prev_sample)

    def compute_rewards(self, prompt_image_pairs: dict[str, Any]) -> torch.Tensor:
        """Score ``prompt_image_pairs`` (TRL's method): rewards ``[B']`` attached to the graph; a reward that
        returns values without gradients is an error that names it."""
        rewards, _ = score(self.reward_fn, prompt_image_pairs["images"], prompt_image_pairs["prompts"],
                           prompt_image_pairs["prompt_metadata"], keep_grad=True)
        return rewards

    def calculate_loss(self, rewards: torch.Tensor) -> torch.Tensor:
        """``-reward_coefficient * mean(rewards)``: maximise the reward (TRL hard-coded ``10 - mean(rewards)``,
        the same gradient for a coefficient of 1)."""
        return -self.config.reward_coefficient * rewards.mean()

    # ------------------------------------------------------------------ results
    def save_pretrained(self, save_directory: str) -> None:
        """Write the fine-tuned model (LoRA weights or a full pipeline) and a model card; all processes call it."""
        run.save_result(self.accelerator, self.policy, self.config, self.last_metrics, "AlignProp", save_directory)

    def push_to_hub(self, repo_id: str, commit_message: str = "diffrl AlignProp fine-tune") -> str | None:
        """Save to a temporary folder and upload it (token from ``HF_TOKEN`` or the login cache, never logged)."""
        return run.push_result(self.accelerator, self.policy, self.config, self.last_metrics, "AlignProp", repo_id,
                               commit_message)

    def _save_pretrained(self, save_directory: str) -> None:  # TRL's private name, kept for old scripts
        self.save_pretrained(save_directory)

    save_model = save_pretrained

