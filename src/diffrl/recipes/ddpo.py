"""DDPOTrainer: sample -> reward -> advantages -> policy-gradient updates (Black et al. 2023).

The loop of TRL 0.23's trainer, with its defects fixed (see ``shared/REFERENCE.md``): saving works with
the defaults, the image hook never indexes a missing tracker, resume continues exactly (epoch, step,
optimizer, statistics, RNG), saving cannot deadlock several processes, rewards really overlap sampling.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from diffrl.algorithms import (PerPromptStatTracker, batch_advantages, denoising_loss, ppo_clip_loss,
                               reinforce_loss, rwr_sparse_weights, rwr_weights)
from diffrl.config import DDPOConfig
from diffrl.pipelines.types import TextConditioning
from diffrl.recipes import run
from diffrl.recipes.evaluation import PeriodicEvaluator
from diffrl.recipes.rewards import score
from diffrl.recipes.samples import EpochSamples


class DDPOTrainer:
    """``DDPOTrainer(config, reward_function, prompt_function, sd_pipeline, image_samples_hook=None)``, as in TRL.

    ``config.algorithm`` picks DDPO-IS (PPO clipping, the default), DDPO-SF (REINFORCE), RWR or RWR-sparse.
    """

    def __init__(self, config: DDPOConfig, reward_function: Callable, prompt_function: Callable, sd_pipeline: Any,
                 image_samples_hook: Callable | None = None) -> None:
        self.config = config
        self.reward_fn, self.prompt_fn, self.image_samples_callback = reward_function, prompt_function, image_samples_hook
        self.sd_pipeline = sd_pipeline
        start = run.start_run(config, sd_pipeline)
        self.accelerator = acc = start.accelerator
        self.policy, self.run_name, self.run_dir = start.policy, start.run_name, start.run_dir
        self.checkpoints_dir, self.metrics = start.checkpoints_dir, start.metrics
        resume = start.resume
        params = list(self.policy.trainable_parameters())
        optimizer = run.build_optimizer(config, params)
        self.lr_scheduler = run.build_lr_scheduler(config, optimizer, self._total_optimizer_steps())
        self.policy.unet, self.optimizer = acc.prepare(self.policy._unet, optimizer)
        self._params = params
        self.stat_tracker = (PerPromptStatTracker(config.per_prompt_stat_tracking_buffer_size,
                                                  config.per_prompt_stat_tracking_min_count)
                             if config.per_prompt_stat_tracking else None)
        self.executor = ThreadPoolExecutor(config.max_workers) if config.async_reward_computation else None
        self.first_epoch, self.global_step, self.last_metrics = 0, 0, {}
        self.negative_prompts = config.negative_prompt_list
        self.evaluator = PeriodicEvaluator(config, self.policy, reward_function, prompt_function, self.run_dir, acc)
        if resume is not None:
            state = run.load_checkpoint(acc, resume, self.policy, self.optimizer, self.lr_scheduler)
            self.first_epoch, self.global_step = int(state["epoch"]) + 1, int(state["global_step"])
            if self.stat_tracker is not None and state.get("stat_tracker"):
                self.stat_tracker.load_state_dict(state["stat_tracker"])
            self.evaluator.load_state_dict(state.get("evaluation"))
            acc.print(f"resumed from {resume}: continuing at epoch {self.first_epoch}, global step {self.global_step}")

    # ------------------------------------------------------------------ sizes
    def _accumulation_steps(self) -> int:
        c = self.config
        if c.algorithm == "ddpo_sf":  # on-policy: one update from all of an epoch's samples
            return c.sample_batch_size * c.sample_num_batches_per_epoch // c.train_batch_size * c.num_train_timesteps
        return c.train_gradient_accumulation_steps * c.num_train_timesteps

    def _total_optimizer_steps(self) -> int:
        c = self.config
        micro = c.sample_batch_size * c.sample_num_batches_per_epoch // c.train_batch_size * c.num_train_timesteps
        return max(1, c.num_epochs * c.train_num_inner_epochs * micro // self._accumulation_steps())

    # ------------------------------------------------------------------ loop
    def train(self, epochs: int | None = None) -> None:
        """Train from the first (or resumed) epoch up to ``epochs`` (default ``config.num_epochs``)."""
        for epoch in range(self.first_epoch, epochs if epochs is not None else self.config.num_epochs):
            self.global_step = self.step(epoch, self.global_step)
        self.first_epoch = max(self.first_epoch, epochs if epochs is not None else self.config.num_epochs)
        if self.config.log_with:
            self.accelerator.end_training()

    def step(self, epoch: int, global_step: int) -> int:
        """One epoch: sample, score, compute advantages, train ``train_num_inner_epochs`` times; returns the global step."""
        c, acc = self.config, self.accelerator
        timer = run.Timer()
        self.policy.unet.eval()
        trajectories, prompts, prompt_meta, rewards, reward_meta, sample_s = self._sample_epoch(epoch)
        reward_s = timer.lap() - sample_s
        samples = EpochSamples.from_trajectories(trajectories)
        local = torch.cat(rewards)
        all_rewards = acc.gather(local.to(acc.device)).cpu().numpy()
        all_prompts = gather_object(list(prompts)) if acc.num_processes > 1 else list(prompts)
        weights = self._sample_weights(all_rewards, all_prompts)
        image_data = [[t.images, list(p), list(m), r, rm] for t, p, m, r, rm in
                      zip(trajectories, _chunks(prompts, c.sample_batch_size), _chunks(prompt_meta, c.sample_batch_size),
                          rewards, reward_meta)]
        run.call_image_hook(self.image_samples_callback, image_data, global_step, acc)
        stats: dict[str, list[float]] = {}
        for inner in range(c.train_num_inner_epochs):
            global_step = self._train_inner(samples, weights, epoch, inner, global_step, stats)
        train_s = timer.lap()
        metrics = {"epoch": epoch, "reward/mean": float(all_rewards.mean()), "reward/std": float(all_rewards.std()),
                   "reward/max": float(all_rewards.max()), "reward/min": float(all_rewards.min()),
                   "perf/sampling_s": sample_s, "perf/reward_s": reward_s, "perf/training_s": train_s,
                   "perf/epoch_s": sample_s + reward_s + train_s,
                   "perf/samples_per_s": len(all_rewards) / max(1e-9, sample_s + reward_s),
                   "train/lr": self.lr_scheduler.get_last_lr()[0]}
        for key, values in stats.items():
            metrics[key] = float(acc.reduce(torch.tensor(np.mean(values), device=acc.device), "mean"))
        if self.stat_tracker is not None:
            metrics.update({f"stat_tracking/{k}": v for k, v in self.stat_tracker.stats().items()})
        metrics.update(self.evaluator.maybe_run(epoch))
        self.last_metrics = metrics
        self.metrics.log(metrics, step=global_step)
        if run.is_checkpoint_epoch(c, epoch):
            state = {"global_step": global_step, "metrics": metrics,
                     "stat_tracker": self.stat_tracker.state_dict() if self.stat_tracker else None,
                     "evaluation": self.evaluator.state_dict()}
            run.save_checkpoint(acc, self.checkpoints_dir, epoch, c.num_checkpoint_limit, self.policy,
                                self.optimizer, self.lr_scheduler, state)
        return global_step

    # ------------------------------------------------------------------ sampling and rewards
    def _sample_epoch(self, epoch: int):
        c, acc = self.config, self.accelerator
        trajectories, prompts, meta, pending = [], [], [], []
        timer = run.Timer()
        sample_s = 0.0
        for b in tqdm(range(c.sample_num_batches_per_epoch), desc=f"epoch {epoch}: sampling",
                      disable=not acc.is_local_main_process, leave=False):
            batch_prompts, batch_meta = zip(*[self.prompt_fn() for _ in range(c.sample_batch_size)])
            negatives = None
            if self.negative_prompts:
                negatives = [self.negative_prompts[i % len(self.negative_prompts)] for i in range(c.sample_batch_size)]
            with torch.no_grad():
                traj = self.policy.sample(list(batch_prompts), batch_size=c.sample_batch_size,
                                          num_inference_steps=c.sample_num_steps, guidance_scale=c.sample_guidance_scale,
                                          eta=c.sample_eta, negative_prompts=negatives,
                                          generator=run.generator_for(c.seed, epoch, acc.process_index, b)).trajectory
            sample_s += timer.lap()
            trajectories.append(traj)
            prompts += batch_prompts
            meta += batch_meta
            if self.executor is not None:  # score this batch while the next one samples
                pending.append(self.executor.submit(score, self.reward_fn, traj.images, batch_prompts, batch_meta))
            else:
                pending.append(score(self.reward_fn, traj.images, batch_prompts, batch_meta))
                timer.lap()
        results = [p.result() if isinstance(p, Future) else p for p in pending]
        return trajectories, prompts, meta, [r[0] for r in results], [r[1] for r in results], sample_s

    def _sample_weights(self, all_rewards: np.ndarray, all_prompts: list[str]) -> torch.Tensor:
        """This process's per-sample weights: clipped advantages (DDPO) or RWR weights."""
        c, acc = self.config, self.accelerator
        rewards = torch.as_tensor(all_rewards, dtype=torch.float32)
        if c.algorithm == "rwr":
            w = rwr_weights(rewards, c.rwr_temperature)
        elif c.algorithm == "rwr_sparse":
            w = rwr_sparse_weights(rewards, c.rwr_sparse_percentile)
        else:
            adv = (self.stat_tracker.update(all_prompts, all_rewards) if self.stat_tracker is not None
                   else batch_advantages(all_rewards))
            w = torch.as_tensor(adv, dtype=torch.float32).clamp(-c.train_adv_clip_max, c.train_adv_clip_max)
        return w.reshape(acc.num_processes, -1)[acc.process_index].to(acc.device)

    # ------------------------------------------------------------------ training
    def _train_inner(self, samples: EpochSamples, weights: torch.Tensor, epoch: int, inner: int, global_step: int,
                     stats: dict[str, list[float]]) -> int:
        c, acc = self.config, self.accelerator
        generator = run.generator_for(c.seed, epoch, inner, acc.process_index, 1)
        shuffled, perm = samples.shuffled(generator)
        weights = weights[perm.to(weights.device)]
        accumulate = self._accumulation_steps()
        self.policy.unet.train()
        micro = 0
        for start in tqdm(range(0, shuffled.size, c.train_batch_size), desc=f"epoch {epoch}.{inner}: training",
                          disable=not acc.is_local_main_process, leave=False):
            idx = slice(start, start + c.train_batch_size)
            for j in range(c.num_train_timesteps):
                micro += 1
                sync = micro % accumulate == 0
                ctx = contextlib.nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(self.policy.unet)
                with ctx:
                    loss, info = self._loss(shuffled, weights, idx, j, generator)
                    acc.backward(loss / accumulate)
                for k, v in info.items():
                    stats.setdefault(k, []).append(float(v))
                if sync:
                    if c.train_max_grad_norm != float("inf"):
                        norm = acc.clip_grad_norm_(self._params, c.train_max_grad_norm)
                        stats.setdefault("stats/grad_norm", []).append(float(norm))
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    global_step += 1
        self.policy.unet.eval()
        return global_step

    def _conditioning(self, samples: EpochSamples, idx: slice) -> tuple[TextConditioning | None, float]:
        if samples.conditioning is None:
            return None, 1.0
        cond = samples.conditioning.index(idx)
        if self.config.train_cfg and cond.negative_prompt_embeds is not None:
            return cond, self.config.sample_guidance_scale
        return TextConditioning(cond.prompt_embeds, None), 1.0

    def _loss(self, s: EpochSamples, weights: torch.Tensor, idx: slice, j: int, generator: torch.Generator):
        c = self.config
        cond, guidance = self._conditioning(s, idx)
        if c.algorithm in ("rwr", "rwr_sparse"):
            x0, t = s.final[idx], s.timesteps[idx, j]
            noise = torch.randn(x0.shape, generator=generator).to(x0.device)
            x_t, target = self.policy.schedule.training_pair(x0, noise, t)
            plain = None if cond is None else TextConditioning(cond.prompt_embeds, None)
            out = self.policy.predict(x_t, t, plain, 1.0)
            loss = denoising_loss(out, target, weights[idx])
            return loss, {"loss/policy": loss.detach()}
        step = self.policy.step_log_prob(s.latents[idx, j], s.timesteps[idx, j], s.prev_timesteps[idx, j],
                                         s.next_latents[idx, j], cond, eta=c.sample_eta, guidance_scale=guidance)
        loss_fn = ppo_clip_loss if c.algorithm == "ddpo_is" else reinforce_loss
        loss, st = loss_fn(step.log_prob, s.log_probs[idx, j], weights[idx], c.train_clip_range)
        return loss, {"loss/policy": loss.detach(), "stats/approx_kl": st.approx_kl, "stats/clipfrac": st.clipfrac,
                      "stats/ratio": st.ratio}

    def calculate_loss(self, latents, timesteps, next_latents, log_probs, advantages, embeds):
        """TRL's per-step loss: returns ``(loss, approx_kl, clipfrac)``. ``embeds`` is ``[neg; pos]`` with guidance."""
        c = self.config
        guided = c.train_cfg and self.policy.is_conditional and c.sample_guidance_scale > 1.0
        cond = None
        if self.policy.is_conditional:
            cond = TextConditioning(*reversed(embeds.chunk(2))) if guided else TextConditioning(embeds, None)
        prev = self.policy.schedule.prev_timesteps(timesteps, c.sample_num_steps)
        step = self.policy.step_log_prob(latents, timesteps, prev, next_latents, cond, eta=c.sample_eta,
                                         guidance_scale=c.sample_guidance_scale if guided else 1.0)
        adv = torch.clamp(advantages, -c.train_adv_clip_max, c.train_adv_clip_max)
        loss, st = ppo_clip_loss(step.log_prob, log_probs, adv, c.train_clip_range)
        return loss, st.approx_kl, st.clipfrac

    # ------------------------------------------------------------------ results
    def save_pretrained(self, save_directory: str) -> None:
        """Write the fine-tuned model (LoRA weights or a full pipeline) and a model card; all processes call it."""
        run.save_result(self.accelerator, self.policy, self.config, self.last_metrics, "DDPO", save_directory)

    def push_to_hub(self, repo_id: str, commit_message: str = "diffrl DDPO fine-tune") -> str | None:
        """Save to a temporary folder and upload it (token from ``HF_TOKEN`` or the login cache, never logged)."""
        return run.push_result(self.accelerator, self.policy, self.config, self.last_metrics, "DDPO", repo_id,
                               commit_message)

    def _save_pretrained(self, save_directory: str) -> None:  # TRL's private name, kept for old scripts
        self.save_pretrained(save_directory)

    save_model = save_pretrained


def _chunks(seq, size):
    seq = list(seq)
    return [seq[i:i + size] for i in range(0, len(seq), size)]
