"""NFTTrainer: DiffusionNFT, online RL on the forward process (Zheng et al., ICLR 2026; NVlabs/DiffusionNFT).

One epoch: the old policy (an EMA of the trained weights) samples clean images with any solver (deterministic
DDIM by default, DPM-Solver++, or a stochastic sampler) -> rewards -> group advantages -> optimality
probabilities ``r`` -> the NFT loss on freshly noised copies of the samples (:func:`diffrl.algorithms.nft_loss`,
x0 space, no CFG) -> optimizer steps -> one EMA update of the old policy. Only the final samples, their
conditioning and rewards are stored: no trajectories, no log-probabilities. The run around the epoch
(accelerator, resume, evaluation, checkpoints, metrics, saving) is the :class:`~diffrl.recipes.trainer.Trainer`'s.
The image hook gets DDPO's ``[[images, prompts, prompt_metadata, rewards, reward_metadata], ...]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffrl.algorithms import (EMA_SCHEDULES, NFTStats, advantages_to_optimality, ema_update,
                               gathered_group_advantages, nft_loss, prediction_kl, sample_train_timesteps)
from diffrl.pipelines.sharded import local_slice
from diffrl.recipes.epoch import EpochResult, Timer, Timings
from diffrl.recipes.recipe import RecipeBase
from diffrl.recipes.run import Run
from diffrl.recipes.samples import ScoredBatch, cycled_negatives, gather_rewards
from diffrl.recipes.update import MicroStep, UpdateLoop
from diffrl.rewards import score
from diffrl.samplers import DenoisingSchedule, DPMSolverSchedule, sampling_schedule
from diffrl.seeding import Stream, generator_for

__all__ = ["OLD_POLICY_FILE", "NFTRecipe", "NFTSamples"]

OLD_POLICY_FILE = "nft_old_policy.safetensors"
"""The old policy's EMA tensors, beside the trainer's files in every checkpoint folder."""

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


class NFTRecipe(RecipeBase):
    """DiffusionNFT on any policy (see the module docstring)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        c, policy = self.config, self.policy
        if policy.is_conditional and c.group_size < 2:
            raise ValueError(f"group_size={c.group_size}: a text model's advantages compare the images of one "
                             "prompt, and a group of 1 has none to compare with (every r would be 0.5). Set "
                             "group_size to 2 or more (the paper: 24 per prompt).")
        if policy.is_conditional and c.sample_batch_size % c.group_size:
            raise ValueError(f"sample_batch_size={c.sample_batch_size} is not a multiple of group_size="
                             f"{c.group_size}; set sample_batch_size to a multiple of it.")
        self.ema_schedule = EMA_SCHEDULES[c.nft_ema_schedule]
        self.old: Params = {}

    def setup(self, run: Run) -> None:
        """The update loop (DDP as every recipe), then the reference snapshot (full fine-tuning with a KL term) and
        the old policy, both taken before a resume loads the checkpoint's weights."""
        c = self.config
        self.run = run
        total = max(1, c.num_epochs * c.train_num_inner_epochs * c.minibatches_per_epoch()
                    // c.train_gradient_accumulation_steps)
        self.update = UpdateLoop(run.accelerator, self.policy, c, run.guard, total_steps=total,
                                 backward_calls=c.train_gradient_accumulation_steps * self.train_timesteps())
        store = torch.device("cpu") if c.nft_old_policy_on_cpu else run.accelerator.device
        if self.uses_reference():
            self.policy.snapshot_reference(store)  # a no-op for LoRA (adapters off is the reference)
        self.old = {n: p.detach().to(store, copy=True) for n, p in self.trained().items()}
        self.sampling_schedule = self.make_sampling_schedule()

    def uses_reference(self) -> bool:
        """Whether the loss reads the frozen reference model (NFT: for its KL term)."""
        return self.config.nft_kl_coef > 0

    def trained(self) -> Params:
        """The trained parameters by name (the keys of ``trainable_state_dict``), not copies."""
        return {n: p for n, p in self.policy.trainable_module.named_parameters() if p.requires_grad}

    def make_sampling_schedule(self) -> DenoisingSchedule | DPMSolverSchedule:
        """``nft_sampler`` on the model's own noise schedule."""
        c = self.config
        return sampling_schedule(c.nft_sampler, self.policy.schedule,
                                 dpm_solver_order=c.nft_dpm_solver_order)

    def train_timesteps(self) -> int:
        """Training timesteps drawn per sample and inner epoch (``train_timestep_fraction`` of the sampling steps)."""
        return max(1, int(self.config.sample_num_steps * self.config.train_timestep_fraction))

    # ------------------------------------------------------------------ state (the old policy is a checkpoint file)
    def state_dict(self) -> dict[str, Any]:
        return {"nft_old_policy": OLD_POLICY_FILE}

    def load_files(self, folder: Path) -> None:
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
                target = self.old[name]
                if hasattr(target, "to_local"):  # FSDP2: the old policy is sharded as the weights are
                    target.to_local().copy_(local_slice(target, value))
                else:
                    target.copy_(value)

    def save_files(self, folder: Path) -> None:
        """The old policy, ``nft_old_policy.safetensors``, inside the checkpoint's atomic commit."""
        # FSDP2: the old policy's shards are gathered whole (a collective: every process calls save_files).
        whole = {n: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
                 for n, v in self.old.items()}
        if self.run.accelerator.is_main_process:
            save_file(whole, folder / OLD_POLICY_FILE)

    def old_params(self) -> Params:
        """The old policy as ``params`` for the policy's forward passes (on the accelerator)."""
        device = self.run.accelerator.device
        return {n: v.to(device, non_blocking=True) for n, v in self.old.items()}

    # ------------------------------------------------------------------ the epoch
    def run_epoch(self, epoch: int, global_step: int) -> EpochResult:
        """Sample with the old policy and score, map rewards to ``r``, train, update the old policy."""
        c = self.config
        self.policy.eval()
        batches, sampling_s, reward_s = self.sample_epoch(epoch, global_step)
        self.run.show_images([b.hook_row() for b in batches], global_step)
        samples, all_rewards = self.optimality(batches)
        stats: dict[str, list[torch.Tensor]] = {}
        timer = Timer()
        for inner in range(c.train_num_inner_epochs):
            global_step = self.train_inner(samples, epoch, inner, global_step, stats)
        decay = self.ema_schedule.decay(global_step)
        ema_update(self.old, self.trained(), decay)  # NVlabs: once per epoch, decay by optimizer steps
        extra = {**self.signal_stats(samples), "stats/ema_decay": decay}
        return EpochResult(global_step, all_rewards, Timings(sampling_s, reward_s, timer.lap()), stats, extra,
                           tuple(b.reward_metadata for b in batches))

    def signal(self, advantages: torch.Tensor) -> torch.Tensor:
        """The per-sample training signal from the clipped group advantages: NFT's optimality ``r`` in [0, 1]."""
        return advantages_to_optimality(advantages, self.config.train_adv_clip_max)

    def signal_stats(self, samples: NFTSamples) -> dict[str, float]:
        """The epoch's summary of the per-sample training signal: NFT's mean optimality ``r``."""
        return {"stats/optimality_mean": float(samples.r.mean())}

    # ------------------------------------------------------------------ sampling and rewards
    def sample_epoch(self, epoch: int, global_step: int) -> tuple[list[ScoredBatch], float, float]:
        """``sample_num_batches_per_epoch`` scored batches of clean samples (``group_size`` per prompt draw for
        text models), and the seconds spent sampling and scoring."""
        c, acc = self.config, self.run.accelerator
        per_prompt = c.group_size if self.policy.is_conditional else 1
        timer = Timer()
        sampling_s = reward_s = 0.0
        batches = []
        for b in tqdm(range(c.sample_num_batches_per_epoch), desc=f"epoch {epoch}: sampling",
                      disable=not acc.is_local_main_process, leave=False):
            draws = [self.prompt_fn() for _ in range(c.sample_batch_size // per_prompt)]
            prompts = [p for p, _ in draws for _ in range(per_prompt)]
            metadata = [m for _, m in draws for _ in range(per_prompt)]
            with torch.no_grad():
                x0, cond = self.sample_x0(prompts, generator_for(Stream.SAMPLE_NOISE, c.seed, epoch,
                                                                 acc.process_index, b))
                images = self.policy.decode(x0)
            self.run.check_samples({"images": images, "latents": x0}, epoch, global_step)
            sampling_s += timer.lap()
            reward, reward_meta = score(self.reward_fn, images, prompts, metadata)
            reward_s += timer.lap()
            batches.append(ScoredBatch((x0, cond), images, prompts, metadata, reward, reward_meta))
        return batches, sampling_s, reward_s

    def optimality(self, batches: list[ScoredBatch]) -> tuple[NFTSamples, torch.Tensor]:
        """This process's samples with their training signal (:meth:`signal` of the group advantages), and every
        process's rewards."""
        c, acc = self.config, self.run.accelerator
        all_rewards = gather_rewards(acc, [b.rewards for b in batches])
        local = sum(len(b.rewards) for b in batches)
        group = c.group_size if self.policy.is_conditional else None
        group_ids = self.group_ids(local, group, acc.num_processes)
        adv = gathered_group_advantages(all_rewards, group_ids, acc.process_index, acc.num_processes,
                                        std=c.adv_std, clip=c.train_adv_clip_max)
        r = self.signal(adv).to(acc.device)
        conds = [b.samples[1] for b in batches]
        cond = None if conds[0] is None else type(conds[0]).concat(conds)
        return NFTSamples(torch.cat([b.samples[0] for b in batches]), cond, r), all_rewards

    @staticmethod
    def group_ids(local: int, group: int | None, num_processes: int) -> torch.Tensor:
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
        if policy.is_conditional:
            cond = policy.encode_prompts(prompts, cycled_negatives(c.negative_prompt_list, len(prompts)),
                                         guidance=guidance > 1.0, height=c.sample_height, width=c.sample_width)
        params = self.old_params()
        x = policy.initial_noise(len(prompts), generator, c.sample_height, c.sample_width)
        x = self.sampling_schedule.denoise(x, lambda x_t, t: policy.predict(x_t, t, cond, guidance, params=params),
                                           c.sample_num_steps, eta=c.sample_eta, generator=generator)
        return x.float(), (None if cond is None else cond.without_guidance())

    def train_timestep_grid(self) -> torch.Tensor:
        """``[N]`` the sampling schedule's timesteps, from which each sample's training timesteps are drawn."""
        return self.sampling_schedule.timesteps(self.config.sample_num_steps)

    # ------------------------------------------------------------------ training
    def train_inner(self, samples: NFTSamples, epoch: int, inner: int, global_step: int,
                    stats: dict[str, list[torch.Tensor]]) -> int:
        """One pass over the shuffled samples: each minibatch at each of its drawn timesteps, with fresh noise."""
        c = self.config
        generator = generator_for(Stream.SHUFFLE, c.seed, epoch, inner, self.run.accelerator.process_index)
        n = samples.x0.shape[0]
        perm = torch.randperm(n, generator=generator).to(samples.x0.device)
        timesteps = sample_train_timesteps(self.train_timestep_grid(), n, fraction=c.train_timestep_fraction,
                                           generator=generator).to(samples.x0.device)
        k = timesteps.shape[1]

        def calls() -> Iterator[MicroStep]:
            for start in range(0, n, c.train_batch_size):
                idx = perm[start:start + c.train_batch_size]
                batch = samples.index(idx)
                for j in range(k):
                    noise = torch.randn(batch.x0.shape, generator=generator).to(batch.x0.device)
                    yield MicroStep(1, (batch, timesteps[idx, j], noise))

        return self.update.run(calls(), self.loss, per_update=c.train_gradient_accumulation_steps * k, epoch=epoch,
                               global_step=global_step, stats=stats, desc=f"epoch {epoch}.{inner}: training")

    def loss(self, call: tuple[NFTSamples, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, list[dict]]:
        """The loss of one call of :meth:`train_inner` and its stats."""
        loss, st = self.compute_loss(*call)
        return loss, [{"loss/policy": st.policy_loss, "loss/positive": st.positive_loss,
                       "loss/negative": st.negative_loss, "stats/kl_ref": st.kl_ref,
                       "stats/old_deviation": st.old_deviation}]

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
