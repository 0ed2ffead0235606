"""DDPOTrainer: sample -> reward -> advantages -> policy-gradient updates (Black et al. 2023).

The epoch body only; the run around it (accelerator, resume, evaluation, checkpoints, metrics, saving) is
:class:`~diffrl.recipes.lifecycle.Trainer`'s.
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
from diffrl.recipes.lifecycle import EpochResult, Timer, Trainer, call_image_hook
from diffrl.recipes.memory import ChunkProbe, probe_for
from diffrl.recipes.samples import EpochSamples, chain_chunk, cycled_negatives, training_conditioning
from diffrl.rewards import score
from diffrl.seeding import SAMPLE_NOISE, generator_for


class DDPOTrainer(Trainer):
    """``DDPOTrainer(config, reward_function, prompt_function, sd_pipeline, image_samples_hook=None)``, as in TRL.

    ``config.algorithm`` picks DDPO-IS (PPO clipping, the default), DDPO-SF (REINFORCE), RWR or RWR-sparse.
    """

    trainer_name = "DDPO"
    config_class = DDPOConfig

    def __init__(self, config: DDPOConfig, reward_function: Callable, prompt_function: Callable, sd_pipeline: Any,
                 image_samples_hook: Callable | None = None) -> None:
        self.stat_tracker = (PerPromptStatTracker(config.per_prompt_stat_tracking_buffer_size,
                                                  config.per_prompt_stat_tracking_min_count)
                             if config.per_prompt_stat_tracking else None)
        self.executor = ThreadPoolExecutor(config.max_workers) if config.async_reward_computation else None
        self.negative_prompts = config.negative_prompt_list
        self._fitted_chunk: int | None = None  # automatic train_timestep_chunk, once measured
        super().__init__(config, reward_function, prompt_function, sd_pipeline, image_samples_hook)

    # ------------------------------------------------------------------ sizes and state
    def _accumulation_steps(self) -> int:
        c = self.config
        if c.algorithm == "ddpo_sf":  # on-policy: one update from all of an epoch's samples
            return c.sample_batch_size * c.sample_num_batches_per_epoch // c.train_batch_size * c.num_train_timesteps
        return c.train_gradient_accumulation_steps * c.num_train_timesteps

    def deepspeed_accumulation_steps(self) -> int:
        """Backward calls per optimizer step (each fused call covers ``_timestep_chunk()`` timesteps)."""
        return max(1, self._accumulation_steps() // max(1, min(self.config.train_timestep_chunk or
                                                               self.config.num_train_timesteps,
                                                               self.config.num_train_timesteps)))

    def total_optimizer_steps(self) -> int:
        c = self.config
        micro = c.sample_batch_size * c.sample_num_batches_per_epoch // c.train_batch_size * c.num_train_timesteps
        return max(1, c.num_epochs * c.train_num_inner_epochs * micro // self._accumulation_steps())

    def trainer_state(self) -> dict[str, Any]:
        # The fitted chunk is kept so a resumed run makes the same calls (the same fp32 sums) as an uninterrupted one.
        return {"stat_tracker": self.stat_tracker.state_dict() if self.stat_tracker else None,
                "fitted_timestep_chunk": self._fitted_chunk}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        if self.stat_tracker is not None and state.get("stat_tracker"):
            self.stat_tracker.load_state_dict(state["stat_tracker"])
        self._fitted_chunk = state.get("fitted_timestep_chunk") or self._fitted_chunk

    # ------------------------------------------------------------------ the epoch
    def run_epoch(self, epoch: int, global_step: int) -> EpochResult:
        """Sample, score, compute advantages, train ``train_num_inner_epochs`` times."""
        c, acc = self.config, self.accelerator
        self.policy.unet.eval()
        batches = self._sample_epoch(epoch, global_step)
        samples = EpochSamples.from_trajectories([b[0] for b in batches])
        local = torch.cat([b[3] for b in batches])
        all_rewards = acc.gather(local.to(acc.device)).cpu().numpy()
        prompts = [p for b in batches for p in b[1]]
        all_prompts = gather_object(prompts) if acc.num_processes > 1 else prompts
        weights = self._sample_weights(all_rewards, all_prompts)
        image_data = [[traj.images, list(p), list(m), r, rm] for traj, p, m, r, rm in batches]
        call_image_hook(self.image_samples_callback, image_data, global_step, acc)
        stats: dict[str, list[torch.Tensor]] = {}
        timer = Timer()
        for inner in range(c.train_num_inner_epochs):
            global_step = self._train_inner(samples, weights, epoch, inner, global_step, stats)
        train_s = timer.lap()
        sample_s, reward_s = self._sampling_s, self._reward_s
        metrics = {"reward/mean": float(all_rewards.mean()), "reward/std": float(all_rewards.std()),
                   "reward/max": float(all_rewards.max()), "reward/min": float(all_rewards.min()),
                   "perf/sampling_s": sample_s, "perf/reward_s": reward_s, "perf/training_s": train_s,
                   "perf/epoch_s": sample_s + reward_s + train_s,
                   "perf/samples_per_s": len(all_rewards) / max(1e-9, sample_s + reward_s)}
        for key, values in stats.items():
            metrics[key] = float(acc.reduce(torch.stack(values).float().mean().to(acc.device), "mean"))
        if self.stat_tracker is not None:
            metrics.update({f"stat_tracking/{k}": v for k, v in self.stat_tracker.stats().items()})
        return EpochResult(global_step, metrics, len(all_rewards))

    # ------------------------------------------------------------------ sampling and rewards
    def _sample_epoch(self, epoch: int, global_step: int) -> list[tuple]:
        """``sample_num_batches_per_epoch`` batches of ``(trajectory, prompts, prompt_metadata, rewards,
        reward_metadata)``. Up to :meth:`_sample_batch_chunk` batches are drawn as one chain; sample ``j`` of batch
        ``b`` draws its noise from its own generator, so the samples do not depend on the grouping. Rewards are
        computed per batch; with ``async_reward_computation`` each batch is scored while the next chain samples."""
        c, acc = self.config, self.accelerator
        sampled, pending = [], []
        timer = Timer()
        self._sampling_s = reward_s = 0.0
        size, chunk = c.sample_batch_size, self._sample_batch_chunk()
        for first in tqdm(range(0, c.sample_num_batches_per_epoch, chunk), desc=f"epoch {epoch}: sampling",
                          disable=not acc.is_local_main_process, leave=False):
            group = range(first, min(first + chunk, c.sample_num_batches_per_epoch))
            batches = [tuple(zip(*[self.prompt_fn() for _ in range(size)])) for _ in group]
            negatives = cycled_negatives(self.negative_prompts, size, len(group))
            generators = [generator_for(c.seed, epoch, SAMPLE_NOISE, acc.process_index, b, j) for b in group for j in range(size)]
            with torch.no_grad():
                traj = self.policy.sample([p for prompts, _ in batches for p in prompts], batch_size=size * len(group),
                                          num_inference_steps=c.sample_num_steps, guidance_scale=c.sample_guidance_scale,
                                          eta=c.sample_eta, negative_prompts=negatives, generator=generators,
                                          height=c.sample_height, width=c.sample_width).trajectory
            self.guard.check_samples({"images": traj.images, "latents": traj.latents, "log-probabilities":
                                      traj.log_probs}, epoch, global_step, c.train_learning_rate)
            self._sampling_s += timer.lap()
            for k, (prompts, prompt_meta) in enumerate(batches):
                part = traj.rows(slice(k * size, (k + 1) * size)) if len(group) > 1 else traj
                sampled.append((part, prompts, prompt_meta))
                if self.executor is not None:  # score this batch while the next chain samples
                    pending.append(self.executor.submit(score, self.reward_fn, part.images, prompts, prompt_meta))
                else:
                    pending.append(score(self.reward_fn, part.images, prompts, prompt_meta))
                    reward_s += timer.lap()
        results = [p.result() if isinstance(p, Future) else p for p in pending]
        self._reward_s = reward_s + timer.lap()  # with async scoring: the wait for what was still running
        return [(traj, p, m, r[0], r[1]) for (traj, p, m), r in zip(sampled, results)]

    def _sample_batch_chunk(self) -> int:
        """Sample batches per chain at most: ``sample_batch_chunk``, or (0) all of an epoch's on the CPU when rewards
        are not scored asynchronously (that overlaps scoring with the next batch), one otherwise."""
        c = self.config
        return chain_chunk(c.sample_batch_chunk, c.sample_num_batches_per_epoch,
                           self.accelerator.device.type == "cpu" and self.executor is None)

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
    def prepare(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        optimizer = super().prepare(optimizer)
        if self.config.compile_unet:  # sampling and training calls go through the compiled module
            self.policy.use_forward_module(torch.compile(self.policy.unet))
        return optimizer

    def _timestep_chunk(self) -> int:
        """Timesteps of a micro-batch per UNet call: ``train_timestep_chunk``, or (0) automatic: the first call runs
        one timestep and measures what it keeps for the backward pass, the rest as many as fit half the free
        memory (:mod:`diffrl.recipes.memory`)."""
        n, asked = self.config.num_train_timesteps, self.config.train_timestep_chunk
        if asked:
            return min(asked, n)
        return self._fitted_chunk or 1

    def _train_inner(self, samples: EpochSamples, weights: torch.Tensor, epoch: int, inner: int, global_step: int,
                     stats: dict[str, list[torch.Tensor]]) -> int:
        """One pass over the shuffled samples. Each micro-batch's ``n`` timesteps run ``K`` at a time in one UNet
        call of ``K * B`` rows (``K = _timestep_chunk()``); its loss is the mean over those rows, i.e.
        ``(1/K) sum_j loss_j`` of the step-by-step losses, so ``backward(loss * K / accumulate)`` gives exactly the
        gradient of ``sum_j backward(loss_j / accumulate)``. ``accumulate`` is a multiple of ``n`` (whole
        micro-batches per optimizer step), so a call never spans an optimizer step. The stats stay per-timestep
        means over ``B`` samples, as in the step-by-step loop."""
        c, acc = self.config, self.accelerator
        generator = generator_for(c.seed, epoch, inner, acc.process_index, 1)
        shuffled, perm = samples.shuffled(generator)
        weights = weights[perm.to(weights.device)]
        accumulate, n = self._accumulation_steps(), c.num_train_timesteps
        self.policy.unet.train()
        micro = 0
        for start in tqdm(range(0, shuffled.size, c.train_batch_size), desc=f"epoch {epoch}.{inner}: training",
                          disable=not acc.is_local_main_process, leave=False):
            idx = slice(start, start + c.train_batch_size)
            first = 0
            while first < n:
                steps = range(first, min(first + self._timestep_chunk(), n))
                first = steps.stop
                micro += len(steps)
                sync = micro % accumulate == 0
                ctx = contextlib.nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(self.policy.unet)
                probe = self._memory_probe()
                with ctx, probe or contextlib.nullcontext():
                    loss, infos = self._loss(shuffled, weights, idx, steps, generator)
                    self.backward(loss * (len(steps) / accumulate), sync)
                if probe is not None:  # every process takes the smallest fit, so all run the same calls
                    fitted = torch.tensor([probe.fit(n)], device=acc.device)
                    self._fitted_chunk = int(acc.gather(fitted).min()) if acc.num_processes > 1 else int(fitted)
                for info in infos:
                    for k, v in info.items():
                        stats.setdefault(k, []).append(v)
                if sync:
                    global_step = self.optimizer_update(epoch, global_step, stats)
        self.policy.unet.eval()
        return global_step

    def _memory_probe(self) -> ChunkProbe | None:
        """With an automatic chunk, the first training call is measured (once per run)."""
        if self.config.train_timestep_chunk or self._fitted_chunk:
            return None
        return probe_for(self.accelerator.device, self.policy.trainable_module)

    def _loss(self, s: EpochSamples, weights: torch.Tensor, idx: slice, steps: range,
              generator: torch.Generator) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """The loss of micro-batch ``idx`` at timesteps ``steps`` (``K`` of them) in one UNet call of ``K * B`` rows,
        timestep-major (row ``k * B + b`` is sample ``b`` at timestep ``steps[k]``): the mean over the rows, and
        the detached stats of each timestep (means over its ``B`` rows, as one step alone would give)."""
        c, k = self.config, len(steps)
        window = slice(steps.start, steps.stop)
        batch = s.timesteps[idx].shape[0]

        def rows(x: torch.Tensor) -> torch.Tensor:  # [B, N, ...] -> [K * B, ...], timestep-major
            return x[idx, window].transpose(0, 1).reshape(k * batch, *x.shape[2:])

        cond, guidance = training_conditioning(s, idx, self.config.train_cfg, self.config.sample_guidance_scale)
        if cond is not None and k > 1:
            cond = cond.index(torch.arange(batch, device=cond.prompt_embeds.device).repeat(k))
        w = weights[idx].repeat(k)
        t = rows(s.timesteps)
        if c.algorithm in ("rwr", "rwr_sparse"):
            x0 = s.final[idx]  # the noise of each timestep drawn in the step-by-step loop's order
            noise = torch.cat([torch.randn(x0.shape, generator=generator) for _ in steps]).to(x0.device)
            x_t, target = self.policy.schedule.training_pair(x0.repeat(k, *([1] * (x0.ndim - 1))), noise, t)
            plain = None if cond is None else cond.without_guidance()
            out = self.policy.predict(x_t, t, plain, 1.0)
            loss = denoising_loss(out, target, w)
            with torch.no_grad():
                infos = [{"loss/policy": denoising_loss(o, g, wb)}
                         for o, g, wb in zip(out.chunk(k), target.chunk(k), w.chunk(k))]
            return loss, infos
        step = self.policy.step_log_prob(rows(s.latents), t, rows(s.prev_timesteps), rows(s.next_latents), cond,
                                         eta=c.sample_eta, guidance_scale=guidance)
        loss_fn = ppo_clip_loss if c.algorithm == "ddpo_is" else reinforce_loss
        old = rows(s.log_probs)
        loss, _ = loss_fn(step.log_prob, old, w, c.train_clip_range)
        infos = []
        with torch.no_grad():
            for lp, o, wb in zip(step.log_prob.detach().chunk(k), old.chunk(k), w.chunk(k)):
                part, st = loss_fn(lp, o, wb, c.train_clip_range)
                infos.append({"loss/policy": part, "stats/approx_kl": st.approx_kl, "stats/clipfrac": st.clipfrac,
                              "stats/ratio": st.ratio})
        return loss, infos

    # ------------------------------------------------------------------ TRL's method names
    def loss(self, advantages: torch.Tensor, clip_range: float, ratio: torch.Tensor) -> torch.Tensor:
        """TRL's PPO surrogate on given ratios: ``mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))``."""
        return ppo_clip_loss(torch.log(ratio), torch.zeros_like(ratio), advantages, clip_range)[0]

    def calculate_loss(self, latents, timesteps, next_latents, log_probs, advantages, embeds):
        """TRL's per-step loss: returns ``(loss, approx_kl, clipfrac)``. ``embeds`` is ``[neg; pos]`` with guidance,
        as TRL passed it, or the ``conditioning`` of a sample from :meth:`_generate_samples` (any policy, SDXL too)."""
        c = self.config
        guided = c.train_cfg and self.policy.is_conditional and c.sample_guidance_scale > 1.0
        cond = None
        if self.policy.is_conditional and isinstance(embeds, torch.Tensor):  # TRL's [neg; pos] states
            cond = TextConditioning(*reversed(embeds.chunk(2))) if guided else TextConditioning(embeds, None)
        elif self.policy.is_conditional:  # a policy's own conditioning (SDXL's holds pooled states and time ids)
            guided = guided and embeds.negative_prompt_embeds is not None
            cond = embeds if guided else embeds.without_guidance()
        prev = self.policy.schedule.prev_timesteps(timesteps, c.sample_num_steps)
        step = self.policy.step_log_prob(latents, timesteps, prev, next_latents, cond, eta=c.sample_eta,
                                         guidance_scale=c.sample_guidance_scale if guided else 1.0)
        adv = torch.clamp(advantages, -c.train_adv_clip_max, c.train_adv_clip_max)
        loss, st = ppo_clip_loss(step.log_prob, log_probs, adv, c.train_clip_range)
        return loss, st.approx_kl, st.clipfrac

    def compute_rewards(self, prompt_image_pairs: list, is_async: bool = False) -> list:
        """TRL's method: score ``[[images, prompts, prompt_metadata], ...]``; returns ``[(rewards, metadata), ...]``
        (futures resolved)."""
        out = []
        for images, prompts, prompt_metadata, *_ in prompt_image_pairs:
            if is_async and self.executor is not None:
                out.append(self.executor.submit(score, self.reward_fn, images, prompts, prompt_metadata))
            else:
                out.append(score(self.reward_fn, images, prompts, prompt_metadata))
        return [o.result() if isinstance(o, Future) else o for o in out]

    def _generate_samples(self, iterations: int, batch_size: int) -> tuple[list[dict], list[list]]:
        """TRL's method: ``iterations`` batches; returns TRL's sample dicts (``prompt_ids``, ``prompt_embeds``,
        ``timesteps``, ``latents``, ``next_latents``, ``log_probs``, ``negative_prompt_embeds``) and the
        ``[images, prompts, prompt_metadata]`` pairs."""
        c = self.config
        samples, pairs = [], []
        for b in range(iterations):
            prompts, prompt_meta = zip(*[self.prompt_fn() for _ in range(batch_size)])
            with torch.no_grad():
                traj = self.policy.sample(list(prompts), batch_size=batch_size, num_inference_steps=c.sample_num_steps,
                                          guidance_scale=c.sample_guidance_scale, eta=c.sample_eta,
                                          generator=generator_for(c.seed, self.global_step, b, 7),
                                          height=c.sample_height, width=c.sample_width).trajectory
            cond = traj.conditioning
            samples.append({
                "prompt_ids": _prompt_ids(self.policy, list(prompts)),
                "prompt_embeds": None if cond is None else cond.prompt_embeds,
                "timesteps": traj.timesteps, "latents": traj.latents[:, :-1], "next_latents": traj.latents[:, 1:],
                "log_probs": traj.log_probs,
                "negative_prompt_embeds": None if cond is None else cond.negative_prompt_embeds,
                "conditioning": cond,
            })
            pairs.append([traj.images, list(prompts), list(prompt_meta)])
        return samples, pairs


def _prompt_ids(policy, prompts: list[str]) -> torch.Tensor | None:
    """``[B, L]`` token ids as TRL returned them (``None`` for unconditional models)."""
    tokenizer = getattr(policy, "tokenizer", None)
    if not policy.is_conditional or tokenizer is None:
        return None
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids

