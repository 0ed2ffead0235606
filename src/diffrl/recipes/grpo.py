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

The run around the epoch (accelerator, resume, evaluation, checkpoints, metrics) is
:class:`~diffrl.recipes.lifecycle.Trainer`'s.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping, NamedTuple

import torch
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from diffrl.algorithms import gathered_group_advantages, gaussian_mean_kl, grpo_loss, sde_window
from diffrl.config import GRPOConfig
from diffrl.recipes.lifecycle import EpochResult, Timer, Trainer, call_image_hook
from diffrl.recipes.samples import EpochSamples, training_conditioning
from diffrl.rewards import score
from diffrl.seeding import SAMPLE_NOISE, generator_for

__all__ = ["EpochLayout", "GRPOTrainer", "epoch_advantages", "epoch_layout", "epoch_window"]

# Streams of generator_for(seed, epoch, STREAM, ...): one per kind of draw, so no two draws share noise.
_WINDOW, _GROUP_NOISE, _STEP_NOISE = 11, 12, 14  # and seeding.SAMPLE_NOISE (13)


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
                      generator=generator_for(c.seed, epoch, _WINDOW))


def epoch_advantages(rewards: torch.Tensor | Mapping[str, torch.Tensor], config: GRPOConfig, process_index: int,
                     num_processes: int, weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """``[n]`` clipped group advantages of this process's samples from the gathered ``[P * G]`` rewards (or a
    mapping of them with ``weights``, ``multi_reward``), in epoch order; groups are ``sample_id // group_size``."""
    c = config
    group_ids = torch.arange(c.samples_per_epoch()) // c.group_size
    return gathered_group_advantages(rewards, group_ids, process_index, num_processes, weights=weights,
                                     std=c.adv_std, eps=c.adv_eps, clip=c.train_adv_clip_max)


class GRPOTrainer(Trainer):
    """``GRPOTrainer(config, reward_function, prompt_function, sd_pipeline, image_samples_hook=None)``.

    The image hook gets DDPO's ``[[images, prompts, prompt_metadata, rewards, reward_metadata], ...]`` per batch.
    Metrics besides DDPO's: ``stats/kl_ref`` (with ``kl_coef > 0``), ``stats/window_start``,
    ``stats/zero_std_groups`` (fraction of groups whose rewards were all equal: no gradient from them).
    """

    trainer_name = "GRPO"
    config_class = GRPOConfig

    def check_inputs(self) -> None:
        if self.config.multi_reward and not getattr(self.reward_fn, "components", None):
            raise ValueError("multi_reward=true needs a combined reward (reward=combined, diffrl.rewards.WeightedSum) "
                             "that returns its components; this reward has none. Set multi_reward=false.")

    def prepare(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        if self.config.kl_coef > 0 and hasattr(self.policy, "snapshot_reference"):
            # Full fine-tuning keeps a frozen copy of the initial weights (LoRA: nothing to do); taken before any
            # update and before a resume loads trained weights.
            self.policy.snapshot_reference("cpu" if self.config.reference_on_cpu else None)
        return super().prepare(optimizer)

    def total_optimizer_steps(self) -> int:
        c = self.config
        per_process = c.samples_per_process(self.accelerator.num_processes)
        step = c.train_batch_size * c.train_gradient_accumulation_steps
        return max(1, c.num_epochs * c.train_num_inner_epochs * per_process // step)

    # ------------------------------------------------------------------ the epoch
    def run_epoch(self, epoch: int, global_step: int) -> EpochResult:
        """Sample the groups, score, compute group advantages, train ``train_num_inner_epochs`` times."""
        c, acc = self.config, self.accelerator
        self.policy.unet.eval()
        window = epoch_window(c, epoch)
        layout = epoch_layout(c.prompts_per_epoch, c.group_size, acc.num_processes, acc.process_index)
        batches = self.sample_batches(epoch, global_step, layout, self.epoch_prompts(), window)
        samples = EpochSamples.from_trajectories([b[0] for b in batches])
        rewards = torch.cat([b[3] for b in batches])
        all_rewards = acc.gather(rewards.to(acc.device)).cpu()
        advantages = self._advantages(all_rewards, batches).to(acc.device)
        image_data = [[b[0].images, list(b[1]), list(b[2]), b[3], b[4]] for b in batches]
        call_image_hook(self.image_samples_callback, image_data, global_step, acc)
        stats: dict[str, list[torch.Tensor]] = {}
        timer = Timer()
        for inner in range(c.train_num_inner_epochs):
            global_step = self._train_inner(samples, advantages, epoch, inner, global_step, stats)
        train_s = timer.lap()
        groups = all_rewards.reshape(c.prompts_per_epoch, c.group_size)
        metrics = {"reward/mean": float(all_rewards.mean()), "reward/std": float(all_rewards.std()),
                   "reward/max": float(all_rewards.max()), "reward/min": float(all_rewards.min()),
                   "reward/group_std": float(groups.std(dim=1, correction=0).mean()),
                   "stats/zero_std_groups": float((groups.std(dim=1, correction=0) == 0).float().mean()),
                   "stats/window_start": float(window.index(True)), "stats/window_size": float(sum(window)),
                   "perf/sampling_s": self._sampling_s, "perf/reward_s": self._reward_s, "perf/training_s": train_s,
                   "perf/epoch_s": self._sampling_s + self._reward_s + train_s,
                   "perf/samples_per_s": len(all_rewards) / max(1e-9, self._sampling_s + self._reward_s)}
        for key, values in stats.items():
            metrics[key] = float(acc.reduce(torch.stack(values).float().mean().to(acc.device), "mean"))
        return EpochResult(global_step, metrics, len(all_rewards))

    def epoch_prompts(self) -> list[tuple[str, Any]]:
        """``prompts_per_epoch`` ``(prompt, metadata)`` pairs, the main process's draw on every process."""
        drawn = [self.prompt_fn() for _ in range(self.config.prompts_per_epoch)]
        if self.accelerator.num_processes > 1:
            box = [drawn]
            broadcast_object_list(box, from_process=0)
            drawn = box[0]
        return drawn

    # ------------------------------------------------------------------ sampling and rewards
    def sample_batches(self, epoch: int, global_step: int, layout: EpochLayout, prompts: list[tuple[str, Any]],
                       window: list[bool]) -> list[tuple]:
        """This process's samples in batches of ``sample_batch_size``: ``(trajectory restricted to the window,
        prompts, prompt_metadata, rewards, reward_metadata)``. Sample ``i`` depends on ``(seed, epoch, i)`` only."""
        c = self.config
        start, size = window.index(True), sum(window)
        negatives = c.negative_prompt_list
        out, timer = [], Timer()
        self._sampling_s = self._reward_s = 0.0
        for b in tqdm(range(0, len(layout.sample_ids), c.sample_batch_size), desc=f"epoch {epoch}: sampling",
                      disable=not self.accelerator.is_local_main_process, leave=False):
            ids = layout.sample_ids[b:b + c.sample_batch_size].tolist()
            groups = layout.group_ids[b:b + c.sample_batch_size].tolist()
            names, meta = [prompts[g][0] for g in groups], [prompts[g][1] for g in groups]
            noise = [generator_for(c.seed, epoch, _GROUP_NOISE, g) if c.group_shared_noise
                     else generator_for(c.seed, epoch, SAMPLE_NOISE, i) for g, i in zip(groups, ids)]
            steps = [generator_for(c.seed, epoch, _STEP_NOISE, i) for i in ids]
            with torch.no_grad():
                x_T = self.policy.initial_noise(len(ids), noise, c.sample_height, c.sample_width)
                traj = self.policy.sample(
                    names, batch_size=len(ids), num_inference_steps=c.sample_num_steps,
                    height=c.sample_height, width=c.sample_width,
                    guidance_scale=c.sample_guidance_scale, eta=c.sample_eta, generator=steps, latents=x_T,
                    negative_prompts=[negatives[i % len(negatives)] for i in ids] if negatives else None,
                    sde_steps=window).trajectory
            self.guard.check_samples({"images": traj.images, "latents": traj.latents, "log-probabilities":
                                      traj.log_probs}, epoch, global_step, c.train_learning_rate)
            # Keep only the window: its K + 1 latents, K timesteps and log-probabilities (the deterministic
            # steps are never trained); ``EpochSamples.final`` is then the window's last latent.
            window_traj = traj._replace(latents=traj.latents[:, start:start + size + 1],
                                        timesteps=traj.timesteps[:, start:start + size],
                                        prev_timesteps=traj.prev_timesteps[:, start:start + size],
                                        log_probs=traj.log_probs[:, start:start + size],
                                        stochastic=None)
            self._sampling_s += timer.lap()
            rewards, reward_meta = score(self.reward_fn, traj.images, names, meta)
            self._reward_s += timer.lap()
            out.append((window_traj, names, meta, rewards, reward_meta))
        return out

    def _advantages(self, all_rewards: torch.Tensor, batches: list[tuple]) -> torch.Tensor:
        """This process's ``[n]`` advantages (per-component with ``multi_reward``)."""
        acc = self.accelerator
        if not self.config.multi_reward:
            return epoch_advantages(all_rewards, self.config, acc.process_index, acc.num_processes)
        metas = [b[4] for b in batches]
        if not all(isinstance(m, Mapping) and "components" in m for m in metas):
            raise ValueError("multi_reward=true: the reward's metadata has no 'components' (a combined reward's "
                             "per-reward values). Use reward=combined, or set multi_reward=false.")
        weights = dict(metas[0]["weights"])
        parts = {k: acc.gather(torch.cat([m["components"][k].float().cpu() for m in metas]).to(acc.device)).cpu()
                 for k in weights}
        return epoch_advantages(parts, self.config, acc.process_index, acc.num_processes, weights)

    # ------------------------------------------------------------------ training
    def _train_inner(self, samples: EpochSamples, advantages: torch.Tensor, epoch: int, inner: int,
                     global_step: int, stats: dict[str, list[torch.Tensor]]) -> int:
        c, acc = self.config, self.accelerator
        generator = generator_for(c.seed, epoch, inner, acc.process_index, 1)
        shuffled, perm = samples.shuffled(generator)
        advantages = advantages[perm.to(advantages.device)]
        steps = shuffled.timesteps.shape[1]
        accumulate = c.train_gradient_accumulation_steps * steps
        self.policy.unet.train()
        micro = 0
        for start in tqdm(range(0, shuffled.size, c.train_batch_size), desc=f"epoch {epoch}.{inner}: training",
                          disable=not acc.is_local_main_process, leave=False):
            idx = slice(start, start + c.train_batch_size)
            for j in range(steps):
                micro += 1
                sync = micro % accumulate == 0
                ctx = contextlib.nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(self.policy.unet)
                with ctx:
                    loss, info = self._loss(shuffled, advantages, idx, j)
                    self.backward(loss / accumulate, sync)
                for k, v in info.items():
                    stats.setdefault(k, []).append(v.detach())
                if sync:
                    global_step = self.optimizer_update(epoch, global_step, stats)
        self.policy.unet.eval()
        return global_step

    def _loss(self, s: EpochSamples, advantages: torch.Tensor, idx: slice, j: int):
        """The GRPO loss of window step ``j`` of the samples ``idx``, and its stats."""
        c, policy = self.config, self.policy
        cond, guidance = training_conditioning(s, idx, c.train_cfg, c.sample_guidance_scale)
        args = (s.latents[idx, j], s.timesteps[idx, j], s.prev_timesteps[idx, j], s.next_latents[idx, j], cond)
        step = policy.step_log_prob(*args, eta=c.sample_eta, guidance_scale=guidance)
        kl = None
        if c.kl_coef > 0:
            with torch.no_grad():
                ref = policy.step_log_prob(*args, eta=c.sample_eta, guidance_scale=guidance,
                                           params=policy.reference_params())
            kl = gaussian_mean_kl(step.mean, ref.mean, step.std)
        loss, st = grpo_loss(step.log_prob, s.log_probs[idx, j], advantages[idx], c.train_clip_range, kl, c.kl_coef)
        info = {"loss/policy": st.policy_loss, "loss/total": loss.detach(), "stats/approx_kl": st.approx_kl,
                "stats/clipfrac": st.clipfrac, "stats/ratio": st.ratio,
                "stats/adv_abs_mean": advantages[idx].abs().mean()}
        if kl is not None:
            info["stats/kl_ref"] = st.kl_ref
        return loss, info
