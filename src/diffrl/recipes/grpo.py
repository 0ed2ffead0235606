"""GRPOTrainer: groups of samples per prompt -> group-relative advantages -> PPO-clipped updates with a KL to the
reference model, trained on a window of stochastic steps.

GRPO (Shao et al. 2024) as Flow-GRPO (Liu et al. 2025), DanceGRPO (Xue et al. 2025) and MixGRPO (Li et al. 2025)
apply it to diffusion sampling, here for epsilon/v-prediction UNets and pixel DDPMs sampled with DDIM:

1. ``prompts_per_epoch`` prompts, each sampled ``group_size`` times; sample ``i`` of the epoch (over all
   processes) belongs to group ``i // group_size`` and draws its noise from its own seeded generator, so a run
   samples the same images whatever the process count (``group_shared_noise``: one ``x_T`` per group).
2. Only the steps of this epoch's SDE window are stochastic (``eta > 0``) and stored; the others are
   deterministic DDIM steps (:func:`diffrl.algorithms.sde_window`).
3. The rewards of all processes are gathered and each group is normalised on all of its samples, with global
   group ids (:func:`diffrl.algorithms.gathered_group_advantages`), so a group may straddle two processes.
4. Every window step of every sample is one PPO-clipped term plus ``kl_coef`` times the closed-form KL of the
   step's Gaussian to the reference model's (:func:`diffrl.algorithms.grpo_loss`).

The run around the epoch (accelerator, resume, evaluation, checkpoints, metrics) is the
:class:`~diffrl.recipes.trainer.Trainer`'s. The image hook gets DDPO's ``[[images, prompts, prompt_metadata,
rewards, reward_metadata], ...]`` per batch. The updates stay near the sampling policy by PPO's clip, on the raw
ratio or on GRPO-Guard's normalised one (``ratio_norm``, :mod:`diffrl.algorithms.ratio_norm`), or by the exact KL trust
region (``trust_region``). Metrics besides DDPO's: ``stats/kl_ref`` (with ``kl_coef > 0``),
``stats/window_start``, ``stats/zero_std_groups`` (fraction of groups whose rewards were all equal: no gradient from
them).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, NamedTuple

import torch
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from diffrl.algorithms import gathered_group_advantages, gaussian_mean_kl, grpo_loss, sde_window
from diffrl.algorithms.grpo import add_kl_term
from diffrl.algorithms.ratio_norm import ratio_norm_loss, row_inputs
from diffrl.algorithms.trust_region import kl_to_sampling, trust_region_loss
from diffrl.config import GRPOConfig
from diffrl.recipes.epoch import EpochResult, Timer, Timings
from diffrl.recipes.recipe import RecipeBase
from diffrl.recipes.run import Run
from diffrl.recipes.samples import EpochSamples, ScoredBatch, cycled_negatives, gather_rewards, training_conditioning
from diffrl.recipes.update import MicroStep, UpdateLoop
from diffrl.rewards import score
from diffrl.seeding import Stream, generator_for

__all__ = ["EpochLayout", "GRPORecipe", "epoch_advantages", "epoch_layout", "epoch_window"]



class EpochLayout(NamedTuple):
    """The samples of one epoch that one process draws (``n = prompts_per_epoch * group_size / processes``).

    Attributes:
        sample_ids: ``[n]`` indices of the samples in the whole epoch (process ``r`` holds rows
            ``[r n, (r + 1) n)``, the order in which ``accelerator.gather`` concatenates).
        group_ids: ``[n]`` global group ids, ``sample_id // group_size``: the index of the prompt.
    """

    sample_ids: torch.Tensor
    group_ids: torch.Tensor


def epoch_layout(prompts_per_epoch: int, group_size: int, num_processes: int, process_index: int) -> EpochLayout:
    """This process's share of an epoch of ``prompts_per_epoch`` groups of ``group_size`` samples."""
    total = prompts_per_epoch * group_size
    if total % num_processes:
        raise ValueError(f"{total} samples do not split over {num_processes} processes.")
    n = total // num_processes
    ids = torch.arange(process_index * n, (process_index + 1) * n)
    return EpochLayout(ids, ids // group_size)


def epoch_window(config: GRPOConfig, epoch: int) -> list[bool]:
    """One flag per sampling step: stochastic and trained this epoch (all ``True`` without a window)."""
    c = config
    if not c.sde_window_size:
        return [True] * c.sample_num_steps
    return sde_window(c.sample_num_steps, c.sde_window_size, schedule=c.sde_window_schedule, epoch=epoch,
                      start=c.sde_window_start, shift_every=c.sde_window_shift_every,
                      generator=generator_for(Stream.WINDOW, c.seed, epoch))


def epoch_advantages(rewards: torch.Tensor | Mapping[str, torch.Tensor], config: GRPOConfig, process_index: int,
                     num_processes: int, weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """``[n]`` clipped group advantages of this process's samples from the gathered ``[P * G]`` rewards (or a
    mapping of them with ``weights``, ``multi_reward``), in epoch order; groups are ``sample_id // group_size``."""
    c = config
    group_ids = torch.arange(c.samples_per_epoch()) // c.group_size
    return gathered_group_advantages(rewards, group_ids, process_index, num_processes, weights=weights,
                                     std=c.adv_std, eps=c.adv_eps, clip=c.train_adv_clip_max)


class GRPORecipe(RecipeBase):
    """GRPO on any policy (see the module docstring)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        if self.config.multi_reward and not getattr(self.reward_fn, "components", None):
            raise ValueError("multi_reward=true needs a combined reward (reward=combined, diffrl.rewards.WeightedSum) "
                             "that returns its components; this reward has none. Set multi_reward=false.")

    def setup(self, run: Run) -> None:
        c = self.config
        self.run = run
        per_update = c.train_gradient_accumulation_steps * self.window_steps()
        self.update = UpdateLoop(run.accelerator, self.policy, c, run.guard, total_steps=self.total_optimizer_steps(),
                                 backward_calls=per_update)
        if c.kl_coef > 0:
            # Full fine-tuning keeps a frozen copy of the initial weights (LoRA: nothing to do); taken before any
            # update and before a resume loads trained weights, after sharding (so the copy is sharded too).
            self.policy.snapshot_reference("cpu" if c.reference_on_cpu else None)

    def window_steps(self) -> int:
        """The trained steps of every sample: the window's size (all steps without a window)."""
        return self.config.sde_window_size or self.config.sample_num_steps

    def total_optimizer_steps(self) -> int:
        c = self.config
        per_process = c.samples_per_process(self.run.accelerator.num_processes)
        step = c.train_batch_size * c.train_gradient_accumulation_steps
        return max(1, c.num_epochs * c.train_num_inner_epochs * per_process // step)

    # ------------------------------------------------------------------ the epoch
    def run_epoch(self, epoch: int, global_step: int) -> EpochResult:
        """Sample the groups and score them, compute group advantages, train ``train_num_inner_epochs`` times."""
        c, acc = self.config, self.run.accelerator
        self.policy.eval()
        window = epoch_window(c, epoch)
        layout = epoch_layout(c.prompts_per_epoch, c.group_size, acc.num_processes, acc.process_index)
        batches, sampling_s, reward_s = self.sample_batches(epoch, global_step, layout, self.epoch_prompts(), window)
        samples = EpochSamples.from_trajectories([b.samples for b in batches])
        all_rewards = gather_rewards(acc, [b.rewards for b in batches])
        advantages = self.advantages(all_rewards, batches).to(acc.device)
        self.run.show_images([b.hook_row() for b in batches], global_step)
        stats: dict[str, list[torch.Tensor]] = {}
        timer = Timer()
        for inner in range(c.train_num_inner_epochs):
            global_step = self.train_inner(samples, advantages, epoch, inner, global_step, stats)
        training_s = timer.lap()
        group_std = all_rewards.reshape(c.prompts_per_epoch, c.group_size).std(dim=1, correction=0)
        extra = {"reward/group_std": float(group_std.mean()),
                 "stats/zero_std_groups": float((group_std == 0).float().mean()),
                 "stats/window_start": float(window.index(True)), "stats/window_size": float(sum(window))}
        return EpochResult(global_step, all_rewards, Timings(sampling_s, reward_s, training_s), stats, extra,
                           tuple(b.reward_metadata for b in batches))

    def epoch_prompts(self) -> list[tuple[str, Any]]:
        """``prompts_per_epoch`` ``(prompt, metadata)`` pairs, the main process's draw on every process."""
        drawn = [self.prompt_fn() for _ in range(self.config.prompts_per_epoch)]
        if self.run.accelerator.num_processes > 1:
            box = [drawn]
            broadcast_object_list(box, from_process=0)
            drawn = box[0]
        return drawn

    # ------------------------------------------------------------------ sampling and rewards
    def sample_batches(self, epoch: int, global_step: int, layout: EpochLayout, prompts: list[tuple[str, Any]],
                       window: list[bool]) -> tuple[list[ScoredBatch], float, float]:
        """This process's samples in scored batches of ``sample_batch_size`` (trajectories restricted to the
        window), and the seconds spent sampling and scoring. Sample ``i`` depends on ``(seed, epoch, i)`` only."""
        c = self.config
        start, size = window.index(True), sum(window)
        out, timer = [], Timer()
        sampling_s = reward_s = 0.0
        for b in tqdm(range(0, len(layout.sample_ids), c.sample_batch_size), desc=f"epoch {epoch}: sampling",
                      disable=not self.run.accelerator.is_local_main_process, leave=False):
            ids = layout.sample_ids[b:b + c.sample_batch_size].tolist()
            groups = layout.group_ids[b:b + c.sample_batch_size].tolist()
            names, meta = [prompts[g][0] for g in groups], [prompts[g][1] for g in groups]
            noise = [generator_for(Stream.GROUP_NOISE, c.seed, epoch, g) if c.group_shared_noise
                     else generator_for(Stream.SAMPLE_NOISE, c.seed, epoch, i) for g, i in zip(groups, ids)]
            steps = [generator_for(Stream.STEP_NOISE, c.seed, epoch, i) for i in ids]
            with torch.no_grad():
                x_T = self.policy.initial_noise(len(ids), noise, c.sample_height, c.sample_width)
                traj = self.policy.sample(
                    names, batch_size=len(ids), num_inference_steps=c.sample_num_steps,
                    height=c.sample_height, width=c.sample_width,
                    guidance_scale=c.sample_guidance_scale, eta=c.sample_eta, generator=steps, latents=x_T,
                    negative_prompts=cycled_negatives(c.negative_prompt_list, len(ids)),
                    sde_steps=window, record_means=c.records_means()).trajectory
            self.run.check_samples({"images": traj.images, "latents": traj.latents,
                                    "log-probabilities": traj.log_probs}, epoch, global_step)
            # Keep only the window: its K + 1 latents, K timesteps and log-probabilities (the deterministic
            # steps are never trained); ``EpochSamples.final`` is then the window's last latent.
            window_traj = traj._replace(latents=traj.latents[:, start:start + size + 1],
                                        timesteps=traj.timesteps[:, start:start + size],
                                        prev_timesteps=traj.prev_timesteps[:, start:start + size],
                                        log_probs=traj.log_probs[:, start:start + size],
                                        stochastic=None,
                                        means=None if traj.means is None else traj.means[:, start:start + size])
            sampling_s += timer.lap()
            rewards, reward_meta = score(self.reward_fn, traj.images, names, meta)
            reward_s += timer.lap()
            out.append(ScoredBatch(window_traj, traj.images, names, meta, rewards, reward_meta))
        return out, sampling_s, reward_s

    def advantages(self, all_rewards: torch.Tensor, batches: list[ScoredBatch]) -> torch.Tensor:
        """This process's ``[n]`` advantages (per-component with ``multi_reward``)."""
        acc = self.run.accelerator
        if not self.config.multi_reward:
            return epoch_advantages(all_rewards, self.config, acc.process_index, acc.num_processes)
        metas = [b.reward_metadata for b in batches]
        if not all(isinstance(m, Mapping) and "components" in m for m in metas):
            raise ValueError("multi_reward=true: the reward's metadata has no 'components' (a combined reward's "
                             "per-reward values). Use reward=combined, or set multi_reward=false.")
        weights = dict(metas[0]["weights"])
        parts = {k: gather_rewards(acc, [m["components"][k] for m in metas]) for k in weights}
        return epoch_advantages(parts, self.config, acc.process_index, acc.num_processes, weights)

    # ------------------------------------------------------------------ training
    def train_inner(self, samples: EpochSamples, advantages: torch.Tensor, epoch: int, inner: int,
                    global_step: int, stats: dict[str, list[torch.Tensor]]) -> int:
        """One pass over the shuffled samples: each micro-batch's window steps ``train_timestep_chunk`` at a time in
        one model call (a micro-step of that size; one call per step by default)."""
        c = self.config
        generator = generator_for(Stream.SHUFFLE, c.seed, epoch, inner, self.run.accelerator.process_index)
        shuffled, perm = samples.shuffled(generator)
        advantages = advantages[perm.to(advantages.device)]
        steps = shuffled.timesteps.shape[1]
        chunk = min(c.train_timestep_chunk, steps)

        def calls() -> Iterator[MicroStep]:
            for start in range(0, shuffled.size, c.train_batch_size):
                for first in range(0, steps, chunk):
                    window = range(first, min(first + chunk, steps))
                    yield MicroStep(len(window), (slice(start, start + c.train_batch_size), window))

        return self.update.run(calls(), lambda batch: self.loss(shuffled, advantages, *batch),
                               per_update=c.train_gradient_accumulation_steps * steps, epoch=epoch,
                               global_step=global_step, stats=stats, desc=f"epoch {epoch}.{inner}: training")

    def loss(self, s: EpochSamples, advantages: torch.Tensor, idx: slice, steps: range):
        """The GRPO loss of window steps ``steps`` (``K`` of them) of the samples ``idx`` in one model call of
        ``K * B`` rows, step-major: the mean over the rows (the mean of the step-by-step losses), and each step's
        stats (means over its ``B`` rows, as one step alone gives)."""
        c, policy, k = self.config, self.policy, len(steps)
        batch = s.timesteps[idx].shape[0]

        def rows(x: torch.Tensor) -> torch.Tensor:  # [B, N, ...] -> [K * B, ...], step-major
            return x[idx, steps.start:steps.stop].transpose(0, 1).reshape(k * batch, *x.shape[2:])

        cond, guidance = training_conditioning(s, idx, c.train_cfg, c.sample_guidance_scale)
        if cond is not None and k > 1:
            cond = cond.index(torch.arange(batch, device=cond.prompt_embeds.device).repeat(k))
        args = (rows(s.latents), rows(s.timesteps), rows(s.prev_timesteps), rows(s.next_latents), cond)
        step = policy.step_log_prob(*args, eta=c.sample_eta, guidance_scale=guidance)
        kl = None
        if c.kl_coef > 0:
            with torch.no_grad():
                ref = policy.step_log_prob(*args, eta=c.sample_eta, guidance_scale=guidance,
                                           params=policy.reference_params())
            kl = gaussian_mean_kl(step.mean, ref.mean, step.std)
        adv, old = advantages[idx].repeat(k), rows(s.log_probs)
        kl_old = kl_to_sampling(step.mean, rows(s.means), step.std) if c.records_means() else None
        guard = None
        if c.ratio_norm:  # each row's step std, and GRPO-Guard's 1 / gain (or 1) as its weight
            gain = policy.schedule.output_gain(rows(s.timesteps), rows(s.prev_timesteps)) if c.ratio_norm_reweight \
                else None
            guard = row_inputs(step.std, gain, k * batch)
        loss, whole = self.policy_loss(step.log_prob, old, adv, kl, kl_old, guard)
        infos = []
        with torch.no_grad():
            parts = [x.chunk(k) if x is not None else [None] * k for x in (step.log_prob.detach(), old, adv, kl, kl_old)]
            guards = [None] * k if guard is None else list(zip(*[x.chunk(k) if x is not None else [None] * k
                                                               for x in guard]))
            for lp, o, a, kr, ko, gd in zip(*parts, guards):
                st = whole if k == 1 else self.policy_loss(lp, o, a, kr, ko, gd)[1]
                info = {"loss/policy": st.policy_loss, "stats/approx_kl": st.approx_kl, "stats/ratio": st.ratio,
                        "stats/adv_abs_mean": a.abs().mean()}
                info["loss/total"] = st.policy_loss + (c.kl_coef * st.kl_ref if kr is not None else 0.0) + \
                    (c.trust_region_coef * st.kl_old if c.trust_region == "kl_penalty" else 0.0)
                if c.trust_region == "clip":
                    info["stats/clipfrac"] = st.clipfrac
                else:
                    info.update({"stats/kl_old": st.kl_old, "stats/masked": st.masked})
                if c.ratio_norm:
                    info.update({"stats/kl_old": st.kl_old, "stats/raw_ratio": st.raw_ratio})
                if kr is not None:
                    info["stats/kl_ref"] = st.kl_ref
                infos.append(info)
        return loss, infos

    def policy_loss(self, log_prob: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, kl: torch.Tensor | None,
                    kl_old: torch.Tensor | None,
                    guard: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> tuple[torch.Tensor, Any]:
        """PPO's clipped loss (:func:`grpo_loss`; on GRPO-Guard's normalised ratio with ``guard``, the rows' step
        stds and weights) or the KL trust region's, plus the reference KL."""
        c = self.config
        if c.trust_region == "clip" and guard is not None:
            assert kl_old is not None
            policy, st = ratio_norm_loss(log_prob, old, adv, kl_old, guard[0], c.train_clip_range, guard[1])
            loss, kl_mean = add_kl_term(policy, kl, c.kl_coef)
            return loss, GuardStats(*st, kl_mean.detach())
        if c.trust_region == "clip":
            return grpo_loss(log_prob, old, adv, c.train_clip_range, kl, c.kl_coef)
        policy, st = trust_region_loss(log_prob, old, adv, kl_old, c.trust_region, coef=c.trust_region_coef,
                                       max_kl=c.trust_region_max_kl)
        loss, kl_mean = add_kl_term(policy, kl, c.kl_coef)
        return loss, RegionStats(st.approx_kl, st.ratio, st.policy_loss, st.kl_old, st.masked, kl_mean.detach())


class RegionStats(NamedTuple):
    """A trust-region step's stats with the reference KL beside them."""

    approx_kl: torch.Tensor
    ratio: torch.Tensor
    policy_loss: torch.Tensor
    kl_old: torch.Tensor
    masked: torch.Tensor
    kl_ref: torch.Tensor


class GuardStats(NamedTuple):
    """A RatioNorm step's stats (:class:`~diffrl.algorithms.ratio_norm.RatioNormStats`) with the reference KL."""

    approx_kl: torch.Tensor
    clipfrac: torch.Tensor
    ratio: torch.Tensor
    raw_ratio: torch.Tensor
    policy_loss: torch.Tensor
    kl_old: torch.Tensor
    kl_ref: torch.Tensor
