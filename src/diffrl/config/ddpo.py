"""DDPOConfig: TRL 0.23's fields and defaults, plus the choice of policy-gradient algorithm."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from diffrl.config._base import APPLY, Checks, option
from diffrl.config.resume import OBJECTIVE, SHAPES
from diffrl.config.sections import PPOSection, TimestepEpochSection
from diffrl.config.shared import SharedConfig

__all__ = ["DDPOConfig"]

Algorithm = Literal["ddpo_is", "ddpo_sf", "rwr", "rwr_sparse"]


@dataclasses.dataclass
class DDPOConfig(PPOSection, TimestepEpochSection, SharedConfig):
    """Configuration of ``DDPOTrainer``; every TRL 0.23 ``DDPOConfig`` field with its default.

    Batch rules (TRL's ``DDPOTrainer._config_check``, checked by :meth:`validate`):
    ``sample_batch_size >= train_batch_size``; ``sample_batch_size % train_batch_size == 0``;
    the samples of an epoch, ``sample_batch_size * num_processes * sample_num_batches_per_epoch``,
    divide into whole optimizer steps of
    ``train_batch_size * num_processes * train_gradient_accumulation_steps``. (TRL's docs
    phrase the last rule as "sample_batch_size divisible by the accumulation steps and the
    process count"; the trainer's code, which we follow, checks the epoch totals.)
    """

    # ---- TRL 0.23 DDPO fields (the rest are the sections') ----
    per_prompt_stat_tracking: bool = option(False, resume=OBJECTIVE,
                                            help="Whether to track statistics for each prompt separately.")
    per_prompt_stat_tracking_buffer_size: int = option(16, resume=SHAPES,
                                                       help="Number of reward values to store in the buffer for "
                                                            "each prompt.")
    per_prompt_stat_tracking_min_count: int = option(16, resume=OBJECTIVE,
                                                     help="Rewards a prompt needs before its own statistics replace "
                                                          "the batch's.")
    async_reward_computation: bool = option(False, resume=APPLY,
                                            help="Score one sample batch while the next is sampled.")
    max_workers: int = option(2, resume=APPLY, help="Maximum number of workers to use for async reward computation.")

    # ---- diffrl extras ----
    algorithm: Algorithm = option(
        "ddpo_is", trl=False, resume=OBJECTIVE,
        help="'ddpo_is' (PPO-clipped importance sampling, TRL's), 'ddpo_sf' (REINFORCE, one update per batch), "
             "'rwr' (reward-weighted regression) or 'rwr_sparse' (RWR on the best samples only).")
    rwr_temperature: float = option(1.0, trl=False, resume=APPLY,
                                    help="RWR weights are softmax(reward / rwr_temperature).")
    rwr_sparse_percentile: float = option(90.0, trl=False, resume=APPLY,
                                          help="RWR-sparse trains only on samples whose reward is "
                                               "above this percentile of the epoch (0-100).")
    train_timestep_chunk: int = option(
        0, trl=False, resume=APPLY,
        help="Timesteps of a training micro-batch that run in one UNet call (the same loss and gradient as one call "
             "per timestep; memory grows with it). 0: automatic (the first call runs one timestep and measures its "
             "activations, the rest as many as fit half the free memory). 1: one call per timestep, as TRL.")
    sample_batch_chunk: int = option(
        0, trl=False, resume=APPLY,
        help="Sample batches of an epoch drawn as one chain (the same samples: each draws its noise from its own "
             "seeded generator; rewards are still computed per batch; memory grows with it). 0: automatic (all of "
             "them on the CPU without async_reward_computation, else 1). 1: one chain per batch, as TRL.")
    compile_model: bool = option(False, trl=False, resume=APPLY,
                                 help="torch.compile the trained network for sampling and training (the first calls "
                                      "of each batch shape compile; pays off on long runs).")

    def _check(self, c: Checks, num_processes: int, check_environment: bool) -> None:
        super()._check(c, num_processes, check_environment)
        for name in ("per_prompt_stat_tracking_buffer_size", "per_prompt_stat_tracking_min_count", "max_workers"):
            c.at_least(name, 1)
        c.at_least("train_timestep_chunk", 0)
        c.at_least("sample_batch_chunk", 0)
        self._check_batches(c, num_processes)
        buffer, min_count = "per_prompt_stat_tracking_buffer_size", "per_prompt_stat_tracking_min_count"
        if self.per_prompt_stat_tracking is True and c.ok(buffer, min_count) \
                and self.per_prompt_stat_tracking_min_count > self.per_prompt_stat_tracking_buffer_size:
            c.add(min_count, f"exceeds {buffer}={self.per_prompt_stat_tracking_buffer_size}, so no prompt ever "
                             "gets its own statistics", f"set {min_count} <= {buffer}")
        if c.ok("algorithm", "sample_eta") and self.algorithm in ("ddpo_is", "ddpo_sf") and self.sample_eta == 0:
            c.add("sample_eta", f"{self.algorithm} needs the log-probability of each DDIM step, and with eta=0 the "
                                "step is deterministic (sigma_t = 0: the Gaussian log-density divides by zero)",
                  "set sample_eta > 0 (1.0 as in the paper), or use algorithm=rwr, which needs no log-probability")
        if c.ok("algorithm", "trust_region") and self.trust_region != "clip" and self.algorithm != "ddpo_is":
            c.add("trust_region", f"bounds importance-weighted updates, which {self.algorithm} does not make",
                  "use algorithm=ddpo_is, or remove trust_region")
        if c.ok("algorithm", "ratio_norm") and self.ratio_norm and self.algorithm != "ddpo_is":
            c.add("ratio_norm", f"normalises the importance ratio, which {self.algorithm} does not use",
                  "use algorithm=ddpo_is, or remove ratio_norm")
        if c.ok("algorithm", "train_num_inner_epochs") and self.algorithm == "ddpo_sf" \
                and self.train_num_inner_epochs > 1:
            c.add("train_num_inner_epochs", "ddpo_sf is on-policy REINFORCE (one update per batch); reusing samples "
                                            "needs the importance weights of ddpo_is",
                  "set train_num_inner_epochs=1, or use algorithm=ddpo_is")
        rwr = self.algorithm in ("rwr", "rwr_sparse")
        if rwr:
            c.positive("rwr_temperature")
        if self.algorithm == "rwr_sparse":
            c.between("rwr_sparse_percentile", 0.0, 100.0, high_open=True)
        c.unchanged_unless(rwr, "rwr_temperature", f"with algorithm={self.algorithm!r}")
        c.unchanged_unless(self.algorithm == "rwr_sparse", "rwr_sparse_percentile",
                           f"with algorithm={self.algorithm!r}")

    def _check_batches(self, c: Checks, num_processes: int) -> None:
        """TRL's three batch-size rules (``DDPOTrainer._config_check``), each with a concrete fix."""
        names = ("sample_batch_size", "train_batch_size", "sample_num_batches_per_epoch",
                 "train_gradient_accumulation_steps")
        if not c.ok(*names) or any(getattr(self, n) < 1 for n in names):
            return  # already reported
        sample, train = self.sample_batch_size, self.train_batch_size
        if sample < train:
            c.add("sample_batch_size", f"must be >= train_batch_size={train}",
                  f"set sample_batch_size={train} (or a multiple), or lower train_batch_size")
        elif sample % train:
            divisors = [d for d in range(1, sample + 1) if sample % d == 0 and d <= train]
            c.add("sample_batch_size", f"must be divisible by train_batch_size={train}",
                  f"set sample_batch_size={math.ceil(sample / train) * train}, or train_batch_size={divisors[-1]}")
        per_epoch = self.samples_per_epoch(num_processes)
        per_step = train * num_processes * self.train_gradient_accumulation_steps
        if per_epoch % per_step:
            # sample_batch_size * batches must be a multiple of train_batch_size * accumulation steps
            need = per_step // math.gcd(per_step, sample * num_processes)
            batches = math.ceil(self.sample_num_batches_per_epoch / need) * need
            fix = f"set sample_num_batches_per_epoch={batches}"
            accumulation = [a for a in range(1, self.train_gradient_accumulation_steps)
                            if per_epoch % (train * num_processes * a) == 0]
            if accumulation:
                fix += f", or train_gradient_accumulation_steps={accumulation[-1]}"
            c.add("sample_num_batches_per_epoch",
                  f"gives {per_epoch} samples per epoch (sample_batch_size={sample} x {num_processes} processes x "
                  f"{self.sample_num_batches_per_epoch} batches), not divisible by the {per_step} samples of one "
                  f"optimizer step (train_batch_size={train} x {num_processes} processes x "
                  f"train_gradient_accumulation_steps={self.train_gradient_accumulation_steps})",
                  fix)
