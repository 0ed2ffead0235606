"""GRPOConfig: PPO updates on groups, with the reference KL and the stochastic-step window (GRPO for diffusion)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from diffrl.config._base import APPLY, Checks, option
from diffrl.config.resume import MODEL, OBJECTIVE, SHAPES
from diffrl.config.sections import BatchSection, GroupSection, PPOSection
from diffrl.config.shared import SharedConfig

__all__ = ["GRPOConfig"]

WindowScheduleName = Literal["fixed", "sliding", "random"]
_ONE_CALL = "GRPO samples its batches one chain at a time and does not compile the model; DDPO's options for that are not wired into it"


@dataclasses.dataclass
class GRPOConfig(GroupSection, PPOSection, BatchSection, SharedConfig):
    """Configuration of ``GRPOTrainer`` (Flow-GRPO, DanceGRPO, MixGRPO carried to epsilon/v-prediction UNets).

    An epoch samples ``group_size`` images for each of ``prompts_per_epoch`` prompts, over all processes
    together: ``prompts_per_epoch * group_size`` samples, split evenly over the processes and sampled
    ``sample_batch_size`` at a time. A group may
    straddle two processes: the rewards are gathered and every group is normalised on all of its samples.

    Only the steps of the SDE window (``sde_window_size`` consecutive steps; 0: all steps) are stochastic and
    trained; the others are deterministic DDIM steps (``eta = 0``) that store nothing.
    """

    algorithm: Literal["grpo"] = option("grpo", trl=False, resume=OBJECTIVE,
                                        help="'grpo': group-relative advantages, PPO clipping and a KL to the "
                                             "reference model.")
    prompts_per_epoch: int = option(16, trl=False, resume=SHAPES,
                                    help="Prompts (groups) per epoch over all processes: an epoch is "
                                         "prompts_per_epoch x group_size samples. Unconditional models have one "
                                         "prompt (''): with 1 the group is the whole batch (DDPO's batch "
                                         "statistics); more groups only make sense with group_shared_noise.")
    group_shared_noise: bool = option(False, trl=False, resume=OBJECTIVE,
                                      help="One initial noise x_T per group (DanceGRPO): the images of a group "
                                           "differ only by the noise of the stochastic steps.")
    adv_eps: float = option(1e-4, trl=False, resume=OBJECTIVE,
                            help="Added to the std of the advantage (Flow-GRPO 1e-4, DanceGRPO "
                                 "1e-8).")
    multi_reward: bool = option(False, trl=False, resume=OBJECTIVE,
                                help="With a combined reward (reward=combined), normalise each component in its "
                                     "group and sum the advantages with the components' weights (MixGRPO) instead "
                                     "of normalising the weighted sum.")
    kl_coef: float = option(0.0, trl=False, resume=OBJECTIVE,
                            help="Weight of the KL to the reference (pre-fine-tuning) model per trained step: "
                                 "||mu_theta - mu_ref||^2 / (2 sigma_t^2), mean over pixels; logged as "
                                 "stats/kl_ref (Flow-GRPO 0.04; 0 turns it off and saves a forward pass).")
    reference_on_cpu: bool = option(False, trl=False, resume=MODEL,
                                    help="Full fine-tuning with kl_coef > 0: keep the frozen reference weights on "
                                         "the CPU (saves accelerator memory, costs a copy per reference call). "
                                         "LoRA needs no copy (the reference is the UNet with adapters off).")
    sde_window_size: int = option(0, trl=False, resume=SHAPES,
                                  help="Steps in the stochastic window: only they are sampled with eta > 0 and "
                                       "trained; the rest are deterministic (eta = 0). 0: every step "
                                       "(MixGRPO, Flow-GRPO-Fast use 1-4).")
    sde_window_schedule: WindowScheduleName = option(
        "fixed", trl=False, resume=OBJECTIVE,
        help="Where the window sits each epoch: 'fixed' (at sde_window_start), 'sliding' (one step later every "
             "sde_window_shift_every epochs, wrapping to 0) or 'random' (a uniform start per epoch).")
    sde_window_start: int = option(0, trl=False, resume=OBJECTIVE,
                                   help="First step of the window (0 = the noisiest step) for the "
                                        "fixed schedule, and the sliding schedule's start.")
    sde_window_shift_every: int = option(1, trl=False, resume=OBJECTIVE,
                                         help="Epochs between two moves of the sliding window.")
    train_timestep_chunk: int = option(
        1, trl=False, resume=APPLY,
        help="Window steps of a training micro-batch run in one model call (the same loss and gradient as one call "
             "per step; memory grows with it). 1: one call per step.")

    not_here = {
        "per_prompt_stat_tracking": "in GRPO the group statistics replace per-prompt tracking",
        "per_prompt_stat_tracking_buffer_size": "in GRPO the group statistics replace per-prompt tracking",
        "per_prompt_stat_tracking_min_count": "in GRPO the group statistics replace per-prompt tracking",
        "async_reward_computation": "GRPO scores each batch once, after sampling",
        "max_workers": "GRPO scores each batch once, after sampling",
        "train_timestep_fraction": "GRPO trains the steps of its window (set sde_window_size)",
        "sample_num_batches_per_epoch": "a GRPO epoch is prompts_per_epoch x group_size samples",
        "sample_batch_chunk": _ONE_CALL, "compile_model": _ONE_CALL,
    }

    @property
    def num_train_timesteps(self) -> int:
        """Steps of each trajectory trained on: the window's (``sample_num_steps`` without a window)."""
        return self.sde_window_size or self.sample_num_steps

    def samples_per_epoch(self, num_processes: int = 1) -> int:
        """Samples drawn per epoch over all processes: ``prompts_per_epoch * group_size`` (whatever the count)."""
        return self.prompts_per_epoch * self.group_size

    def samples_per_process(self, num_processes: int = 1) -> int:
        """Samples each process draws per epoch."""
        return self.samples_per_epoch() // num_processes

    def _check(self, c: Checks, num_processes: int, check_environment: bool) -> None:
        super()._check(c, num_processes, check_environment)
        self._check_batches(c, num_processes)
        c.at_least("group_size", 2, "set group_size >= 2: a group of one image has no spread to compare against "
                                    "(DanceGRPO uses 16)")
        c.at_least("prompts_per_epoch", 1)
        c.at_least("adv_eps", 0.0)
        c.at_least("kl_coef", 0.0, "set kl_coef >= 0 (0 turns the reference KL off)")
        if c.ok("sample_eta") and self.sample_eta == 0:
            c.add("sample_eta", "GRPO trains the log-probability of the stochastic steps, and with eta=0 no step is "
                                "stochastic", "set sample_eta > 0 (1.0, as DanceGRPO); use sde_window_size to keep "
                                              "most steps deterministic")
        c.unchanged_unless(not self.train_lora, "reference_on_cpu", "with train_lora=true (the LoRA reference "
                                                                    "needs no copy)")
        c.unchanged_unless(self.kl_coef != 0, "reference_on_cpu", "with kl_coef=0 (no reference is used)")
        if c.ok("train_cfg", "sample_guidance_scale") and not self.train_cfg and self.sample_guidance_scale > 1:
            c.add("train_cfg", f"trains the unguided policy but samples are drawn with sample_guidance_scale="
                               f"{self.sample_guidance_scale}, so the importance ratio is not 1 on-policy",
                  "set sample_guidance_scale=1 for CFG-free training, or train_cfg=true")
        self._check_window(c)
        c.at_least("train_timestep_chunk", 1)

    def _check_window(self, c: Checks) -> None:
        steps, size = self.sample_num_steps, self.sde_window_size
        windowed = c.ok("sde_window_size") and size > 0
        if c.ok("sde_window_size", "sample_num_steps") and not 0 <= size <= steps:
            c.add("sde_window_size", f"must be in [0, sample_num_steps={steps}]: the window is a run of sampling "
                                     "steps", f"set sde_window_size <= {steps} (0: every step stochastic)")
            return
        why = "without a window (sde_window_size=0)"
        for name in ("sde_window_schedule", "sde_window_start", "sde_window_shift_every"):
            c.unchanged_unless(windowed, name, why)
        if not windowed:
            return
        schedule = self.sde_window_schedule
        c.unchanged_unless(schedule != "random", "sde_window_start", "with sde_window_schedule='random'")
        c.unchanged_unless(schedule == "sliding", "sde_window_shift_every", f"with sde_window_schedule={schedule!r}")
        last = steps - size
        if schedule != "random" and c.ok("sde_window_start") and not 0 <= self.sde_window_start <= last:
            c.add("sde_window_start", f"must be in [0, {last}] so that a window of {size} steps fits in "
                                      f"{steps} steps", f"set sde_window_start between 0 and {last}")
        if schedule == "sliding":
            c.at_least("sde_window_shift_every", 1)

    def _check_batches(self, c: Checks, num_processes: int) -> None:
        """An epoch splits evenly over the processes, into sampling batches and into whole optimizer steps."""
        names = ("group_size", "prompts_per_epoch", "sample_batch_size", "train_batch_size",
                 "train_gradient_accumulation_steps")
        if not c.ok(*names) or any(getattr(self, n) < 1 for n in names):
            return  # already reported
        total = self.samples_per_epoch()
        epoch = f"an epoch of prompts_per_epoch={self.prompts_per_epoch} x group_size={self.group_size} = {total}"
        if total % num_processes:
            c.add("prompts_per_epoch", f"gives {epoch} samples, which do not split over {num_processes} processes",
                  f"make prompts_per_epoch x group_size a multiple of {num_processes}")
            return
        per_process = total // num_processes
        sample, train = self.sample_batch_size, self.train_batch_size
        divisors = [d for d in range(1, per_process + 1) if per_process % d == 0]
        if per_process % sample:
            c.add("sample_batch_size", f"does not divide the {per_process} samples each of {num_processes} "
                                       f"process(es) draws ({epoch})",
                  f"set sample_batch_size to a divisor of {per_process}, e.g. "
                  f"{max(d for d in divisors if d <= sample)}")
        step = train * self.train_gradient_accumulation_steps
        if per_process % step:
            c.add("train_batch_size", f"x train_gradient_accumulation_steps={self.train_gradient_accumulation_steps}"
                                      f" = {step} does not divide the {per_process} samples of each process "
                                      f"({epoch}), so an epoch is no whole number of optimizer steps",
                  f"make train_batch_size x train_gradient_accumulation_steps a divisor of {per_process}, e.g. "
                  f"train_batch_size={max(d for d in divisors if d <= train)} with accumulation 1")
