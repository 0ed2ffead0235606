"""NFTConfig: DiffusionNFT (Zheng et al., ICLR 2026) on the shared fields.

No TRL counterpart exists; the field names follow DDPOConfig where the meaning is the same
(``sample_batch_size``, ``train_num_inner_epochs``, ``train_timestep_fraction``, ``train_adv_clip_max``)
and NVlabs/DiffusionNFT's ``config/nft.py`` for the method's own (``beta``, ``kl`` weight, EMA decay type).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from diffrl.config._base import APPLY, Checks, option
from diffrl.config.resume import MODEL, OBJECTIVE, SHAPES
from diffrl.config.sections import GroupSection, TimestepEpochSection
from diffrl.config.shared import SharedConfig

__all__ = ["ForwardProcessConfig", "NFTConfig", "NFTSampler"]

NFTSampler = Literal["ddim", "dpmsolver++", "ddpm"]
EMAScheduleName = Literal["none", "linear", "warm_start"]


@dataclasses.dataclass
class ForwardProcessConfig(GroupSection, TimestepEpochSection, SharedConfig):
    """What the forward-process trainers share (DiffusionNFT, AWM): clean samples from the old (EMA) policy by
    ``nft_sampler``, trained at freshly noised timesteps of the sampling schedule, no log-probabilities.

    One epoch: ``sample_num_batches_per_epoch`` batches of ``sample_batch_size`` samples per process,
    drawn with the old (EMA) policy by ``nft_sampler``; then ``train_num_inner_epochs`` passes over them in
    minibatches of ``train_batch_size``, each sample trained at ``int(sample_num_steps *
    train_timestep_fraction)`` timesteps of the sampling schedule; one optimizer step per
    ``train_gradient_accumulation_steps`` minibatches (all their timesteps accumulated); then one EMA update of
    the old policy. Text models sample ``group_size`` images per prompt (the group of the advantages);
    for an unconditional model all the samples of an epoch are one group.
    """

    # ---- shared fields whose NFT default differs (the paper samples deterministically, without CFG) ----
    sample_eta: float = option(0.0, trl=False, resume=APPLY,
                               help="DDIM eta of nft_sampler=ddim (0: deterministic DDIM, as the paper; NFT needs no "
                                    "log-probabilities).")
    sample_guidance_scale: float = option(1.0, trl=False, resume=APPLY,
                                          help="Classifier-free guidance of the sampler (the paper samples and trains "
                                               "without CFG: 1).")
    train_learning_rate: float = option(3e-4, trl=False, resume=APPLY,
                                        help="Learning rate (the paper's 3e-4 for LoRA).")

    # ---- batches ----
    sample_batch_size: int = option(8, trl=False, resume=SHAPES,
                                    help="Samples per batch per process (a multiple of group_size for text models).")
    sample_num_batches_per_epoch: int = option(2, trl=False, resume=SHAPES,
                                               help="Batches sampled per epoch per process.")
    group_size: int = option(4, trl=False, resume=SHAPES,
                             help="Text models: images per prompt, normalised against each other (GRPO's group). "
                                  "Unconditional models: all samples of an epoch are one group and this is not read.")
    train_num_inner_epochs: int = option(1, trl=False, resume=APPLY, help="Passes over an epoch's samples.")
    train_timestep_fraction: float = option(1.0, trl=False, resume=SHAPES,
                                            help="Fraction of the sampling schedule's timesteps each sample is trained "
                                                 "at (drawn uniformly without replacement).")
    train_adv_clip_max: float = option(5.0, trl=False, resume=APPLY,
                                       help="A_max: advantages are clipped to [-A_max, A_max] and mapped to r = A / "
                                            "A_max / 2 + 0.5.")

    # ---- the method ----
    nft_sampler: NFTSampler = option("ddim", trl=False, resume=OBJECTIVE,
                                     help="Sampler of the training data: 'ddim' (with sample_eta; 0 is "
                                          "deterministic), 'dpmsolver++' (diffusers' multistep DPM-Solver++, "
                                          "deterministic) or 'ddpm' (ancestral).")
    nft_dpm_solver_order: int = option(2, trl=False, resume=OBJECTIVE, help="Order of DPM-Solver++ (1, 2 or 3).")
    nft_kl_coef: float = option(0.0, trl=False, resume=OBJECTIVE,
                                help="Weight of ||eps_theta - eps_ref||^2 to the reference model "
                                     "(NVlabs: 1e-4 on some tasks; 0 skips the reference pass).")
    nft_ema_schedule: EMAScheduleName = option(
        "linear", trl=False, resume=OBJECTIVE,
        help="Decay of the old policy's EMA by optimizer step: 'none' (old = current after every epoch), "
             "'linear' (min(0.001 step, 0.5), NVlabs' default) or 'warm_start' (0 for 75 steps, then "
             "min(0.0075 (step - 75), 0.999)).")
    nft_old_policy_on_cpu: bool = option(False, trl=False, resume=MODEL,
                                         help="Full fine-tuning: keep the old policy's copy "
                                              "(and the reference's) in CPU memory.")

    def minibatches_per_epoch(self) -> int:
        """Training minibatches per inner epoch per process."""
        return self.sample_batch_size * self.sample_num_batches_per_epoch // self.train_batch_size

    def _check(self, c: Checks, num_processes: int, check_environment: bool) -> None:
        super()._check(c, num_processes, check_environment)
        c.at_least("group_size", 1)
        c.at_least("nft_kl_coef", 0.0)
        c.positive("train_adv_clip_max")
        c.unchanged_unless(self.nft_sampler == "dpmsolver++", "nft_dpm_solver_order",
                           f"with nft_sampler={self.nft_sampler!r}")
        if self.nft_sampler == "dpmsolver++":
            c.one_of("nft_dpm_solver_order", (1, 2, 3))
        if c.ok("nft_sampler", "sample_eta") and self.nft_sampler != "ddim" and self.sample_eta != 0.0:
            c.add("sample_eta", f"is DDIM's noise level and has no effect with nft_sampler={self.nft_sampler!r}",
                  "remove sample_eta, or use nft_sampler=ddim")
        if c.ok("nft_old_policy_on_cpu") and self.nft_old_policy_on_cpu is True and self.train_lora is True:
            c.add("nft_old_policy_on_cpu", "applies to full fine-tuning; with LoRA the old policy is a second set "
                  "of adapters (small) and stays on the accelerator", "remove it, or set train_lora=false")
        self._check_batches(c)

    def _check_batches(self, c: Checks) -> None:
        names = ("sample_batch_size", "train_batch_size", "sample_num_batches_per_epoch",
                 "train_gradient_accumulation_steps", "group_size")
        if not c.ok(*names) or any(getattr(self, n) < 1 for n in names):
            return  # already reported
        local = self.sample_batch_size * self.sample_num_batches_per_epoch
        if local % self.train_batch_size:
            c.add("train_batch_size", f"does not divide the {local} samples of an epoch per process "
                  f"(sample_batch_size={self.sample_batch_size} x {self.sample_num_batches_per_epoch} batches)",
                  f"set train_batch_size to a divisor of {local}")
            return
        minibatches = self.minibatches_per_epoch()
        if minibatches % self.train_gradient_accumulation_steps:
            c.add("train_gradient_accumulation_steps",
                  f"does not divide the {minibatches} training minibatches of an epoch",
                  f"set train_gradient_accumulation_steps to a divisor of {minibatches}")
        if self.model is not None and self.sample_batch_size % self.group_size:  # null: the unconditional digits
            c.add("group_size", f"does not divide sample_batch_size={self.sample_batch_size} (a batch holds whole "
                  "groups of one prompt)", f"set sample_batch_size to a multiple of {self.group_size}")


@dataclasses.dataclass
class NFTConfig(ForwardProcessConfig):
    """Configuration of ``NFTTrainer``: the epoch of :class:`ForwardProcessConfig`, trained with DiffusionNFT's loss
    (its implicit policies' ``nft_beta``)."""

    nft_beta: float = option(1.0, trl=False, resume=OBJECTIVE,
                             help="beta of the implicit policies x0_pm (the paper: 1; 0.1 for OCR).")

    def _check(self, c: Checks, num_processes: int, check_environment: bool) -> None:
        super()._check(c, num_processes, check_environment)
        c.positive("nft_beta", "set nft_beta > 0 (the paper uses 1.0)")
