"""NFTTrainer: DiffusionNFT, online RL on the forward process (Zheng et al., ICLR 2026; NVlabs/DiffusionNFT).

One epoch: the old policy (an EMA of the trained weights) samples clean images with any solver (deterministic
DDIM by default, DPM-Solver++, or a stochastic sampler) -> rewards -> group advantages -> optimality
probabilities ``r`` -> the NFT loss on freshly noised copies of the samples (:func:`diffrl.algorithms.nft_loss`,
x0 space, no CFG) -> optimizer steps -> one EMA update of the old policy. Only the final samples, their
conditioning and rewards are stored: no trajectories, no log-probabilities. The run around the epoch
(accelerator, resume, evaluation, checkpoints, metrics, saving) is :class:`~diffrl.recipes.lifecycle.Trainer`'s.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple

import torch
from diffusers import DPMSolverMultistepScheduler
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffrl.algorithms import (EMA_SCHEDULES, NFTStats, advantages_to_optimality, ema_update,
                               gathered_group_advantages, nft_loss, prediction_kl, sample_train_timesteps)
from diffrl.config.nft import NFTConfig
from diffrl.pipelines.schedule import DenoisingSchedule
from diffrl.recipes.lifecycle import EpochResult, Timer, Trainer, call_image_hook, resolve_policy
from diffrl.rewards import score
from diffrl.seeding import generator_for

__all__ = ["OLD_POLICY_FILE", "NFTSamples", "NFTTrainer"]

OLD_POLICY_FILE = "nft_old_policy.safetensors"
"""The old policy's EMA tensors, beside the lifecycle's files in every checkpoint folder."""

Params = dict[str, torch.Tensor]


class NFTSamples(NamedTuple):
    """What one epoch keeps of its samples (this process's ``B``; ``C, h, w`` latent or pixel shape).

    Attributes:
        x0: ``[B, C, h, w]`` the sampler's final clean samples (latents for Stable Diffusion), float32.
        conditioning: the prompts' conditioning without negative states (training has no CFG), or ``None``.
        r: ``[B]`` optimality probabilities in ``[0, 1]`` (:func:`~diffrl.algorithms.advantages_to_optimality`).
    """

    x0: torch.Tensor
    conditioning: Any
    r: torch.Tensor

    def index(self, idx: torch.Tensor) -> "NFTSamples":
        cond = None if self.conditioning is None else self.conditioning.index(idx.to(self.x0.device))
        return NFTSamples(self.x0[idx], cond, self.r[idx])


class NFTTrainer(Trainer):
    """``NFTTrainer(config, reward_function, prompt_function, sd_pipeline, image_samples_hook=None)``, TRL's signature.

    The image hook gets DDPO's ``[[images, prompts, prompt_metadata, rewards, reward_metadata], ...]``.
    """

    trainer_name = "NFT"
    config_class = NFTConfig

    def __init__(self, config: NFTConfig, reward_function: Callable, prompt_function: Callable, sd_pipeline: Any,
                 image_samples_hook: Callable | None = None) -> None:
        self.ema_schedule = EMA_SCHEDULES[config.nft_ema_schedule] if isinstance(config, NFTConfig) else None
        self.old: Params = {}
        super().__init__(config, reward_function, prompt_function, sd_pipeline, image_samples_hook)

    # ------------------------------------------------------------------ setup
    def check_inputs(self) -> None:
        c, policy = self.config, resolve_policy(self.sd_pipeline)
        if policy.is_conditional and c.group_size < 2:
            raise ValueError(f"group_size={c.group_size}: a text model's advantages compare the images of one "
                             "prompt, and a group of 1 has none to compare with (every r would be 0.5). Set "
                             "group_size to 2 or more (the paper: 24 per prompt).")
        if policy.is_conditional and c.sample_batch_size % c.group_size:
            raise ValueError(f"sample_batch_size={c.sample_batch_size} is not a multiple of group_size="
                             f"{c.group_size}; set sample_batch_size to a multiple of it.")

    def prepare(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """DDP as every trainer, then the reference snapshot (full fine-tuning with a KL term) and the old policy,
        both taken before a resume loads the checkpoint's weights."""
        optimizer = super().prepare(optimizer)
        c = self.config
        store = torch.device("cpu") if c.nft_old_policy_on_cpu else self.accelerator.device
        if c.nft_kl_coef > 0 and hasattr(self.policy, "snapshot_reference"):
            self.policy.snapshot_reference(store)  # a no-op for LoRA (adapters off is the reference)
        self.old = {n: p.detach().to(store, copy=True) for n, p in self._trained().items()}
        self.sampling_schedule = self._sampling_schedule()
        return optimizer

    def _trained(self) -> Params:
        """The trained parameters by name (the keys of ``trainable_state_dict``), not copies."""
        return {n: p for n, p in self.policy.trainable_module.named_parameters() if p.requires_grad}

    def _sampling_schedule(self) -> DenoisingSchedule | DPMSolverMultistepScheduler:
        c, config = self.config, self.policy.schedule.scheduler.config
        if c.nft_sampler == "dpmsolver++":
            # diffusers' multistep DPM-Solver++ (Lu et al. 2022), built from the model's own noise schedule.
            return DPMSolverMultistepScheduler.from_config(dict(config), algorithm_type="dpmsolver++",
                                                           solver_order=c.nft_dpm_solver_order)
        return DenoisingSchedule.from_scheduler_config(config, sampler=c.nft_sampler)

    def total_optimizer_steps(self) -> int:
        c = self.config
        return max(1, c.num_epochs * c.train_num_inner_epochs * c.minibatches_per_epoch()
                   // c.train_gradient_accumulation_steps)

    # ------------------------------------------------------------------ state (the old policy is a checkpoint file)
    def trainer_state(self) -> dict[str, Any]:
        return {"nft_old_policy": OLD_POLICY_FILE}

    def load_checkpoint_files(self, folder) -> None:
        file = folder / OLD_POLICY_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{folder} has no {file.name}, the NFT old policy (an EMA of the weights) that "
                                    "every NFT checkpoint holds: it is not an NFT checkpoint, or was written by an "
                                    "older diffrl. Resume from an NFT checkpoint of this run, or start again.")
        saved = load_file(file)
        if set(saved) != set(self.old):
            raise ValueError(f"{file} holds {len(saved)} tensors but this policy trains {len(self.old)}: build it "
                             "with the run's model, train_lora and LoRA settings.")
        with torch.no_grad():
            for name, value in saved.items():
                self.old[name].copy_(value)

    def checkpoint_files(self, folder) -> None:
        """The old policy, ``nft_old_policy.safetensors``, inside the checkpoint's atomic commit."""
        if self.accelerator.is_main_process:
            save_file({n: v.detach().cpu().contiguous() for n, v in self.old.items()}, folder / OLD_POLICY_FILE)

    def old_params(self) -> Params:
        """The old policy as ``params`` for the policy's forward passes (on the accelerator)."""
        device = self.accelerator.device
        return {n: v.to(device, non_blocking=True) for n, v in self.old.items()}

    # ------------------------------------------------------------------ the epoch
    def run_epoch(self, epoch: int, global_step: int) -> EpochResult:
        """Sample with the old policy, score, map rewards to ``r``, train, update the old policy."""
        c, acc = self.config, self.accelerator
        self.policy.unet.eval()
        samples, all_rewards, sample_s, reward_s = self._collect(epoch, global_step)
        stats: dict[str, list[torch.Tensor]] = {}
        timer = Timer()
        for inner in range(c.train_num_inner_epochs):
            global_step = self._train_inner(samples, epoch, inner, global_step, stats)
        decay = self.ema_schedule.decay(global_step)
        ema_update(self.old, self._trained(), decay)  # NVlabs: once per epoch, decay by optimizer steps
        train_s = timer.lap()
        metrics = {"reward/mean": float(all_rewards.mean()), "reward/std": float(all_rewards.std(correction=0)),
                   "reward/max": float(all_rewards.max()), "reward/min": float(all_rewards.min()),
                   "stats/optimality_mean": float(samples.r.mean()), "stats/ema_decay": decay,
                   "perf/sampling_s": sample_s, "perf/reward_s": reward_s, "perf/training_s": train_s,
                   "perf/epoch_s": sample_s + reward_s + train_s,
                   "perf/samples_per_s": len(all_rewards) / max(1e-9, sample_s + reward_s)}
        for key, values in stats.items():
            metrics[key] = float(acc.reduce(torch.stack(values).float().mean().to(acc.device), "mean"))
        return EpochResult(global_step, metrics, len(all_rewards))

    # ------------------------------------------------------------------ sampling and rewards
    def _collect(self, epoch: int, global_step: int) -> tuple[NFTSamples, torch.Tensor, float, float]:
        """This process's samples with their ``r``, every process's rewards, and the seconds spent sampling and
        scoring."""
        c, acc = self.config, self.accelerator
        conditional = self.policy.is_conditional
        group = c.group_size if conditional else c.sample_batch_size
        timer = Timer()
        sample_s = reward_s = 0.0
        x0s, conds, rewards, hook_data = [], [], [], []
        for b in tqdm(range(c.sample_num_batches_per_epoch), desc=f"epoch {epoch}: sampling",
                      disable=not acc.is_local_main_process, leave=False):
            draws = [self.prompt_fn() for _ in range(c.sample_batch_size // group)] if conditional else \
                [self.prompt_fn() for _ in range(c.sample_batch_size)]
            per_prompt = group if conditional else 1
            prompts = [p for p, _ in draws for _ in range(per_prompt)]
            metadata = [m for _, m in draws for _ in range(per_prompt)]
            with torch.no_grad():
                x0, cond = self.sample_x0(prompts, generator_for(c.seed, epoch, acc.process_index, b))
                images = self.policy.decode(x0)
            self.guard.check_samples({"images": images, "latents": x0}, epoch, global_step, c.train_learning_rate)
            sample_s += timer.lap()
            reward, reward_meta = score(self.reward_fn, images, prompts, metadata)
            reward_s += timer.lap()
            x0s.append(x0)
            conds.append(cond)
            rewards.append(reward)
            hook_data.append([images, prompts, metadata, reward, reward_meta])
        call_image_hook(self.image_samples_callback, hook_data, global_step, acc)
        local = torch.cat(rewards)
        all_rewards = acc.gather(local.to(acc.device)).cpu() if acc.num_processes > 1 else local
        group_ids = self._group_ids(len(local), group if conditional else None, acc.num_processes)
        adv = gathered_group_advantages(all_rewards, group_ids, acc.process_index, acc.num_processes,
                                        std=c.nft_advantage_std, clip=c.train_adv_clip_max)
        r = advantages_to_optimality(adv, c.train_adv_clip_max).to(acc.device)
        cond = None if conds[0] is None else type(conds[0]).concat(conds)
        return NFTSamples(torch.cat(x0s), cond, r), all_rewards, sample_s, reward_s

    @staticmethod
    def _group_ids(local: int, group: int | None, num_processes: int) -> torch.Tensor:
        """``[P * local]`` ids in gather order: consecutive runs of ``group`` samples (the images of one prompt
        draw), unique over processes; ``group=None`` (unconditional): one group of every process's samples."""
        if group is None:
            return torch.zeros(num_processes * local, dtype=torch.long)
        return torch.arange(num_processes * local) // group

    def sample_x0(self, prompts: list[str], generator: torch.Generator) -> tuple[torch.Tensor, Any]:
        """Clean samples ``[B, C, h, w]`` of the old policy with ``nft_sampler`` and the training conditioning
        (``None`` for unconditional models). No log-probabilities, no gradients."""
        c, policy = self.config, self.policy
        guidance = c.sample_guidance_scale
        cond = None
        if policy.is_conditional:  # SDXL's add_time_ids follow the sampled size
            size = {"height": c.sample_height, "width": c.sample_width} if policy.kind == "sdxl" else {}
            cond = policy.encode_prompts(prompts, self.config.negative_prompt_list or None, guidance=guidance > 1.0,
                                         **size)
        params = self.old_params()
        x = policy.initial_noise(len(prompts), generator, c.sample_height, c.sample_width)
        batch = x.shape[0]
        schedule = self.sampling_schedule
        if isinstance(schedule, DPMSolverMultistepScheduler):
            schedule.set_timesteps(c.sample_num_steps, device=x.device)  # also resets the solver's history
            for t in schedule.timesteps:
                out = policy.predict(x, t.expand(batch), cond, guidance, params=params)
                x = schedule.step(out, t, x).prev_sample
        else:
            for t in schedule.timesteps(c.sample_num_steps, device=x.device):
                t = t.expand(batch)
                out = policy.predict(x, t, cond, guidance, params=params)
                x = schedule.step(out, x, t, schedule.prev_timesteps(t, c.sample_num_steps), eta=c.sample_eta,
                                  generator=generator, compute_log_prob=False).prev_sample
        return x.float(), (None if cond is None else cond.without_guidance())

    def train_timestep_grid(self) -> torch.Tensor:
        """``[N]`` the sampling schedule's timesteps, from which each sample's training timesteps are drawn."""
        schedule, n = self.sampling_schedule, self.config.sample_num_steps
        if isinstance(schedule, DPMSolverMultistepScheduler):
            schedule.set_timesteps(n)
            return schedule.timesteps.clone()
        return schedule.timesteps(n)

    # ------------------------------------------------------------------ training
    def _train_inner(self, samples: NFTSamples, epoch: int, inner: int, global_step: int,
                     stats: dict[str, list[torch.Tensor]]) -> int:
        c, acc = self.config, self.accelerator
        generator = generator_for(c.seed, epoch, inner, acc.process_index, 1)
        n = samples.x0.shape[0]
        perm = torch.randperm(n, generator=generator).to(samples.x0.device)
        timesteps = sample_train_timesteps(self.train_timestep_grid(), n, fraction=c.train_timestep_fraction,
                                           generator=generator).to(samples.x0.device)
        k = timesteps.shape[1]
        accumulate = c.train_gradient_accumulation_steps * k
        self.policy.unet.train()
        micro = 0
        for start in tqdm(range(0, n, c.train_batch_size), desc=f"epoch {epoch}.{inner}: training",
                          disable=not acc.is_local_main_process, leave=False):
            idx = perm[start:start + c.train_batch_size]
            batch = samples.index(idx)
            for j in range(k):
                micro += 1
                sync = micro % accumulate == 0
                ctx = contextlib.nullcontext() if sync or acc.num_processes == 1 else acc.no_sync(self.policy.unet)
                noise = torch.randn(batch.x0.shape, generator=generator).to(batch.x0.device)
                with ctx:
                    loss, st = self.compute_loss(batch, timesteps[idx, j], noise)
                    self.backward(loss / accumulate, sync)
                for key, value in (("loss/policy", st.policy_loss), ("loss/positive", st.positive_loss),
                                   ("loss/negative", st.negative_loss), ("stats/kl_ref", st.kl_ref),
                                   ("stats/old_deviation", st.old_deviation)):
                    stats.setdefault(key, []).append(value)
                if sync:
                    global_step = self.optimizer_update(epoch, global_step, stats)
        self.policy.unet.eval()
        return global_step

    def compute_loss(self, batch: NFTSamples, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, NFTStats]:
        """The NFT loss of one minibatch at per-sample timesteps ``t`` ``[b]`` with ``noise`` ``[b, C, h, w]``.

        ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (forward process); ``x0_theta`` from the trained
        weights (with gradients), ``x0_old`` from the old policy, both unguided and unclipped (the affine map of
        :mod:`diffrl.algorithms.nft`); with ``nft_kl_coef > 0``, ``||o_theta - o_ref||^2`` on the raw outputs
        (the noise for epsilon models) to the reference (``policy.reference_params()``).
        """
        c, policy = self.config, self.policy
        x_t = policy.noise_to(batch.x0, noise, t)
        out = policy.predict(x_t, t, batch.conditioning, 1.0)
        x0_theta = policy.schedule.x0_from_output(out, x_t.float(), t)
        kl = None
        with torch.no_grad():
            x0_old = policy.predict_x0(x_t, t, batch.conditioning, 1.0, params=self.old_params())
            if c.nft_kl_coef > 0:
                out_ref = policy.predict(x_t, t, batch.conditioning, 1.0, params=policy.reference_params())
        if c.nft_kl_coef > 0:
            kl = prediction_kl(out, out_ref)
        return nft_loss(x0_theta, x0_old, batch.x0, batch.r, c.nft_beta, kl=kl, kl_coef=c.nft_kl_coef)
