"""DDPO (Black et al. 2023): sample -> score -> advantages -> policy-gradient updates.

``config.algorithm`` picks DDPO-IS (PPO clipping, the default), DDPO-SF (REINFORCE, one update per epoch), RWR or
RWR-sparse. The run around the epoch (accelerator, resume, evaluation, checkpoints, metrics) is the
:class:`~diffrl.recipes.trainer.Trainer`'s; TRL's method names are in :mod:`diffrl.recipes.trainers`.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from diffrl.algorithms import (PerPromptStatTracker, batch_advantages, denoising_loss, ppo_clip_loss,
                               reinforce_loss, rwr_sparse_weights, rwr_weights)
from diffrl.algorithms.ratio_norm import ratio_norm_loss, row_inputs
from diffrl.algorithms.trust_region import kl_to_sampling, trust_region_loss
from diffrl.recipes.epoch import EpochResult, Timer, Timings
from diffrl.recipes.memory import probe_for
from diffrl.recipes.recipe import RecipeBase
from diffrl.recipes.run import Run
from diffrl.recipes.samples import (EpochSamples, ScoredBatch, chain_chunk, cycled_negatives, gather_rewards,
                                    training_conditioning)
from diffrl.recipes.update import MicroStep, UpdateLoop
from diffrl.rewards import score
from diffrl.seeding import Stream, generator_for

Stats = dict[str, list[torch.Tensor]]


class DDPORecipe(RecipeBase):
    """DDPO-IS / DDPO-SF / RWR on any policy (see the module docstring)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        c = self.config
        self.stat_tracker = (PerPromptStatTracker(c.per_prompt_stat_tracking_buffer_size,
                                                  c.per_prompt_stat_tracking_min_count)
                             if c.per_prompt_stat_tracking else None)
        self.executor: ThreadPoolExecutor | None = None
        self.fitted_chunk: int | None = None  # automatic train_timestep_chunk, once measured

    def setup(self, run: Run) -> None:
        c = self.config
        self.run = run
        if c.async_reward_computation:
            self.executor = ThreadPoolExecutor(c.max_workers)
        self.update = UpdateLoop(run.accelerator, self.policy, c, run.guard, total_steps=self.total_optimizer_steps(),
                                 backward_calls=self.backward_calls())
        if c.compile_model:  # sampling and training calls go through the compiled module
            self.policy.use_forward_module(torch.compile(self.update.module))

    # ------------------------------------------------------------------ sizes and state
    def accumulation_steps(self) -> int:
        """Micro-steps (one sample batch at one timestep) per optimizer step."""
        c = self.config
        if c.algorithm == "ddpo_sf":  # on-policy: one update from all of an epoch's samples
            return c.sample_batch_size * c.sample_num_batches_per_epoch // c.train_batch_size * c.num_train_timesteps
        return c.train_gradient_accumulation_steps * c.num_train_timesteps

    def backward_calls(self) -> int:
        """Backward calls per optimizer step (each fused call covers ``timestep_chunk()`` timesteps)."""
        c = self.config
        chunk = min(c.train_timestep_chunk or c.num_train_timesteps, c.num_train_timesteps)
        return max(1, self.accumulation_steps() // max(1, chunk))

    def total_optimizer_steps(self) -> int:
        c = self.config
        micro = c.sample_batch_size * c.sample_num_batches_per_epoch // c.train_batch_size * c.num_train_timesteps
        return max(1, c.num_epochs * c.train_num_inner_epochs * micro // self.accumulation_steps())

    def state_dict(self) -> dict[str, Any]:
        # The fitted chunk is kept so a resumed run makes the same calls (the same fp32 sums) as an uninterrupted one.
        return {"stat_tracker": self.stat_tracker.state_dict() if self.stat_tracker else None,
                "fitted_timestep_chunk": self.fitted_chunk}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.stat_tracker is not None and state.get("stat_tracker"):
            self.stat_tracker.load_state_dict(state["stat_tracker"])
        self.fitted_chunk = state.get("fitted_timestep_chunk") or self.fitted_chunk

    # ------------------------------------------------------------------ the epoch
    def run_epoch(self, epoch: int, global_step: int) -> EpochResult:
        """Sample and score, compute advantages, train ``train_num_inner_epochs`` times."""
        acc = self.run.accelerator
        self.policy.eval()
        batches, sampling_s, reward_s = self.sample_epoch(epoch, global_step)
        samples = EpochSamples.from_trajectories([b.samples for b in batches])
        all_rewards = gather_rewards(acc, [b.rewards for b in batches])
        prompts = [p for b in batches for p in b.prompts]
        all_prompts = gather_object(prompts) if acc.num_processes > 1 else prompts
        weights = self.sample_weights(all_rewards.numpy(), all_prompts)
        self.run.show_images([b.hook_row() for b in batches], global_step)
        stats: Stats = {}
        timer = Timer()
        for inner in range(self.config.train_num_inner_epochs):
            global_step = self.train_inner(samples, weights, epoch, inner, global_step, stats)
        extra = {f"stat_tracking/{k}": v for k, v in self.stat_tracker.stats().items()} if self.stat_tracker else {}
        return EpochResult(global_step, all_rewards, Timings(sampling_s, reward_s, timer.lap()), stats, extra,
                           tuple(b.reward_metadata for b in batches))

    # ------------------------------------------------------------------ sampling and rewards
    def sample_epoch(self, epoch: int, global_step: int) -> tuple[list[ScoredBatch], float, float]:
        """``sample_num_batches_per_epoch`` scored batches of trajectories, and the seconds spent sampling and
        scoring. Up to :meth:`sample_batch_chunk` batches are drawn as one chain; sample ``j`` of batch ``b`` draws
        its noise from its own generator, so the samples do not depend on the grouping. Rewards are computed per
        batch; with ``async_reward_computation`` each batch is scored while the next chain samples."""
        c, acc = self.config, self.run.accelerator
        sampled, pending = [], []
        timer = Timer()
        sampling_s = reward_s = 0.0
        size, chunk = c.sample_batch_size, self.sample_batch_chunk()
        for first in tqdm(range(0, c.sample_num_batches_per_epoch, chunk), desc=f"epoch {epoch}: sampling",
                          disable=not acc.is_local_main_process, leave=False):
            group = range(first, min(first + chunk, c.sample_num_batches_per_epoch))
            batches = [tuple(zip(*[self.prompt_fn() for _ in range(size)])) for _ in group]
            generators = [generator_for(Stream.SAMPLE_NOISE, c.seed, epoch, acc.process_index, b, j)
                          for b in group for j in range(size)]
            with torch.no_grad():
                traj = self.policy.sample([p for prompts, _ in batches for p in prompts], batch_size=size * len(group),
                                          num_inference_steps=c.sample_num_steps, guidance_scale=c.sample_guidance_scale,
                                          eta=c.sample_eta, generator=generators, height=c.sample_height,
                                          width=c.sample_width,
                                          negative_prompts=cycled_negatives(c.negative_prompt_list, size, len(group)),
                                          record_means=c.records_means()).trajectory
            self.run.check_samples({"images": traj.images, "latents": traj.latents,
                                    "log-probabilities": traj.log_probs}, epoch, global_step)
            sampling_s += timer.lap()
            for k, (prompts, prompt_meta) in enumerate(batches):
                part = traj.rows(slice(k * size, (k + 1) * size)) if len(group) > 1 else traj
                sampled.append((part, list(prompts), list(prompt_meta)))
                if self.executor is not None:  # score this batch while the next chain samples
                    pending.append(self.executor.submit(score, self.reward_fn, part.images, prompts, prompt_meta))
                else:
                    pending.append(score(self.reward_fn, part.images, prompts, prompt_meta))
                    reward_s += timer.lap()
        results = [p.result() if isinstance(p, Future) else p for p in pending]
        reward_s += timer.lap()  # with async scoring: the wait for what was still running
        batches = [ScoredBatch(t, t.images, p, m, r[0], r[1]) for (t, p, m), r in zip(sampled, results)]
        return batches, sampling_s, reward_s

    def sample_batch_chunk(self) -> int:
        """Sample batches per chain at most: ``sample_batch_chunk``, or (0) all of an epoch's on the CPU when rewards
        are not scored asynchronously (that overlaps scoring with the next batch), one otherwise."""
        c = self.config
        return chain_chunk(c.sample_batch_chunk, c.sample_num_batches_per_epoch,
                           self.run.accelerator.device.type == "cpu" and self.executor is None)

    def sample_weights(self, all_rewards: np.ndarray, all_prompts: list[str]) -> torch.Tensor:
        """This process's per-sample weights: clipped advantages (DDPO) or RWR weights."""
        c, acc = self.config, self.run.accelerator
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
    def timestep_chunk(self) -> int:
        """Timesteps of a micro-batch per model call: ``train_timestep_chunk``, or (0) automatic: the first call
        runs one timestep and measures what it keeps for the backward pass, the rest as many as fit half the free
        memory (:mod:`diffrl.recipes.memory`)."""
        n, asked = self.config.num_train_timesteps, self.config.train_timestep_chunk
        if asked:
            return min(asked, n)
        return self.fitted_chunk or 1

    def train_inner(self, samples: EpochSamples, weights: torch.Tensor, epoch: int, inner: int, global_step: int,
                    stats: Stats) -> int:
        """One pass over the shuffled samples. Each micro-batch's ``n`` timesteps run ``K`` at a time in one model
        call of ``K * B`` rows (``K = timestep_chunk()``), a micro-step of size ``K`` for the update loop; its loss
        is the mean over those rows, so the accumulated gradient is that of the step-by-step losses.
        ``accumulation_steps()`` is a multiple of ``n`` (whole micro-batches per optimizer step), so a call never
        spans an optimizer step. The stats stay per-timestep means over ``B`` samples."""
        c = self.config
        generator = generator_for(Stream.SHUFFLE, c.seed, epoch, inner, self.run.accelerator.process_index)
        shuffled, perm = samples.shuffled(generator)
        weights = weights[perm.to(weights.device)]
        n = c.num_train_timesteps

        def calls() -> Iterator[MicroStep]:
            for start in range(0, shuffled.size, c.train_batch_size):
                first = 0
                while first < n:  # the chunk is read anew after each call: the first call may fit it
                    steps = range(first, min(first + self.timestep_chunk(), n))
                    first = steps.stop
                    yield MicroStep(len(steps), (slice(start, start + c.train_batch_size), steps))

        return self.update.run(calls(), lambda batch: self.loss(shuffled, weights, *batch, generator),
                               per_update=self.accumulation_steps(), epoch=epoch, global_step=global_step, stats=stats,
                               desc=f"epoch {epoch}.{inner}: training", around=self.measured_call)

    @contextlib.contextmanager
    def measured_call(self) -> Iterator[None]:
        """With an automatic chunk, the first training call of the run is measured and the chunk fitted; every
        process takes the smallest fit, so all make the same calls."""
        acc = self.run.accelerator
        if self.config.train_timestep_chunk or self.fitted_chunk:
            yield
            return
        probe = probe_for(acc.device, self.policy.trainable_module)
        with probe:
            yield
        fitted = torch.tensor([probe.fit(self.config.num_train_timesteps)], device=acc.device)
        self.fitted_chunk = int(acc.gather(fitted).min()) if acc.num_processes > 1 else int(fitted)

    def loss(self, s: EpochSamples, weights: torch.Tensor, idx: slice, steps: range,
             generator: torch.Generator) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        """The loss of micro-batch ``idx`` at timesteps ``steps`` (``K`` of them) in one model call of ``K * B``
        rows, timestep-major (row ``k * B + b`` is sample ``b`` at timestep ``steps[k]``): the mean over the rows,
        and the detached stats of each timestep (means over its ``B`` rows, as one step alone would give)."""
        c, k = self.config, len(steps)
        window = slice(steps.start, steps.stop)
        batch = s.timesteps[idx].shape[0]

        def rows(x: torch.Tensor) -> torch.Tensor:  # [B, N, ...] -> [K * B, ...], timestep-major
            return x[idx, window].transpose(0, 1).reshape(k * batch, *x.shape[2:])

        cond, guidance = training_conditioning(s, idx, c.train_cfg, c.sample_guidance_scale)
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
        old = rows(s.log_probs)
        if c.trust_region != "clip":  # the exact KL to the sampling policy's recorded means bounds the update
            kl_old = kl_to_sampling(step.mean, rows(s.means), step.std)
            region = dict(coef=c.trust_region_coef, max_kl=c.trust_region_max_kl)
            loss, _ = trust_region_loss(step.log_prob, old, w, kl_old, c.trust_region, **region)
            infos = []
            with torch.no_grad():
                for lp, o, wb, ko in zip(step.log_prob.detach().chunk(k), old.chunk(k), w.chunk(k), kl_old.chunk(k)):
                    part, st = trust_region_loss(lp, o, wb, ko, c.trust_region, **region)
                    infos.append({"loss/policy": st.policy_loss, "loss/total": part, "stats/approx_kl": st.approx_kl,
                                  "stats/ratio": st.ratio, "stats/kl_old": st.kl_old, "stats/masked": st.masked})
            return loss, infos
        if c.ratio_norm:  # GRPO-Guard's normalised ratio, each timestep's loss weighted by 1 / its gain
            kl_old = kl_to_sampling(step.mean, rows(s.means), step.std)
            gain = self.policy.schedule.output_gain(t, rows(s.prev_timesteps)) if c.ratio_norm_reweight else None
            std, scale = row_inputs(step.std, gain, k * batch)
            loss, _ = ratio_norm_loss(step.log_prob, old, w, kl_old, std, c.train_clip_range, scale)
            infos = []
            with torch.no_grad():
                parts = [x.chunk(k) if x is not None else [None] * k
                         for x in (step.log_prob.detach(), old, w, kl_old, std, scale)]
                for lp, o, wb, ko, sd, sc in zip(*parts):
                    _, st = ratio_norm_loss(lp, o, wb, ko, sd, c.train_clip_range, sc)
                    infos.append({"loss/policy": st.policy_loss, "stats/approx_kl": st.approx_kl,
                                  "stats/clipfrac": st.clipfrac, "stats/ratio": st.ratio,
                                  "stats/raw_ratio": st.raw_ratio, "stats/kl_old": st.kl_old})
            return loss, infos
        loss_fn = ppo_clip_loss if c.algorithm == "ddpo_is" else reinforce_loss
        loss, _ = loss_fn(step.log_prob, old, w, c.train_clip_range)
        infos = []
        with torch.no_grad():
            for lp, o, wb in zip(step.log_prob.detach().chunk(k), old.chunk(k), w.chunk(k)):
                part, st = loss_fn(lp, o, wb, c.train_clip_range)
                infos.append({"loss/policy": part, "stats/approx_kl": st.approx_kl, "stats/clipfrac": st.clipfrac,
                              "stats/ratio": st.ratio})
        return loss, infos
