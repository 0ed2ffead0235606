"""Sections several trainers share: sampled batches trained over inner epochs (DDPO, GRPO, DiffusionNFT), an epoch of
batches trained at a fraction of its timesteps (DDPO, DiffusionNFT), PPO-clipped updates (DDPO, GRPO) and
group-relative advantages (GRPO, DiffusionNFT). A trainer whose default differs redeclares the field."""

from __future__ import annotations

import dataclasses
from typing import Literal

from diffrl.config._base import APPLY, Checks, ConfigBase, option
from diffrl.config.resume import OBJECTIVE, SHAPES

__all__ = ["AdvantageStd", "BatchSection", "GroupSection", "PPOSection", "TimestepEpochSection"]

AdvantageStd = Literal["group", "global"]


@dataclasses.dataclass
class BatchSection(ConfigBase):
    """Samples drawn in batches, then trained on for some inner epochs (TRL's DDPO fields)."""

    sample_batch_size: int = option(1, resume=SHAPES, help="Batch size (per GPU) to use for sampling.")
    train_num_inner_epochs: int = option(1, resume=APPLY, help="Number of inner epochs per outer epoch.")

    def _check(self, c: Checks, num_processes: int, check_environment: bool) -> None:
        super()._check(c, num_processes, check_environment)
        c.at_least("sample_batch_size", 1)
        c.at_least("train_num_inner_epochs", 1)


@dataclasses.dataclass
class TimestepEpochSection(BatchSection):
    """An epoch of ``sample_num_batches_per_epoch`` batches per process, each sample trained at a fraction of its
    sampling timesteps (TRL's DDPO fields)."""

    sample_num_batches_per_epoch: int = option(2, resume=SHAPES, help="Number of batches to sample per epoch.")
    train_timestep_fraction: float = option(1.0, resume=SHAPES, help="Fraction of timesteps to train on.")

    @property
    def num_train_timesteps(self) -> int:
        """Timesteps each sample is trained at: ``int(sample_num_steps * train_timestep_fraction)``, as TRL."""
        return int(self.sample_num_steps * self.train_timestep_fraction)

    def samples_per_epoch(self, num_processes: int = 1) -> int:
        """Samples drawn per epoch over all processes."""
        return self.sample_batch_size * num_processes * self.sample_num_batches_per_epoch

    def _check(self, c: Checks, num_processes: int, check_environment: bool) -> None:
        super()._check(c, num_processes, check_environment)
        c.at_least("sample_num_batches_per_epoch", 1)
        c.between("train_timestep_fraction", 0.0, 1.0, low_open=True)
        if c.ok("sample_num_steps", "train_timestep_fraction") and self.sample_num_steps >= 1 \
                and 0 < self.train_timestep_fraction <= 1 and self.num_train_timesteps < 1:
            c.add("train_timestep_fraction",
                  f"leaves int({self.sample_num_steps} * {self.train_timestep_fraction}) = 0 timesteps to train on",
                  f"set train_timestep_fraction >= {1 / self.sample_num_steps:.4g}")


TrustRegionName = Literal["clip", "kl_penalty", "kl_mask"]


@dataclasses.dataclass
class PPOSection(ConfigBase):
    """Updates with PPO's clipped importance ratio on clipped advantages (TRL's DDPO fields)."""

    train_cfg: bool = option(True, resume=SHAPES, help="Whether to use classifier-free guidance during training.")
    train_adv_clip_max: float = option(5.0, resume=APPLY, infinite=True,
                                       help="Clip advantages to [-train_adv_clip_max, train_adv_clip_max].")
    train_clip_range: float = option(1e-4, resume=APPLY, help="PPO clip range.")
    trust_region: TrustRegionName = option(
        "clip", trl=False, resume=OBJECTIVE,
        help="How updates stay near the sampling policy: 'clip' (PPO's ratio clipping, train_clip_range), "
             "'kl_penalty' (Flow-DPPO: + trust_region_coef x the exact per-step Gaussian KL to the sampling "
             "policy) or 'kl_mask' (that KL above trust_region_max_kl stops the step's gradient when the ratio has "
             "moved the advantage's way). The KL modes store each step's sampling mean (memory: the latents again).")
    trust_region_coef: float = option(1.0, trl=False, resume=OBJECTIVE,
                                      help="Weight of the KL to the sampling policy with trust_region=kl_penalty.")
    trust_region_max_kl: float = option(1e-3, trl=False, resume=OBJECTIVE,
                                        help="KL bound per step (mean over pixels) with trust_region=kl_mask.")
    ratio_norm: bool = option(
        False, trl=False, resume=OBJECTIVE,
        help="GRPO-Guard's RatioNorm (arXiv 2510.22319): PPO's clip acts on the log-ratio re-centred by the exact "
             "step KL to the sampling policy and scaled by the step's std (zero-mean, the same spread at every "
             "step). With trust_region=clip; stores each step's sampling mean (memory: the latents again).")
    ratio_norm_reweight: bool = option(
        True, trl=False, resume=OBJECTIVE,
        help="With ratio_norm: divide each step's loss by how far the step moves per unit of model output "
             "(GRPO-Guard's 1/dt on flow models; the DDIM step's gain on UNets), so every noise level pulls alike.")

    def records_means(self) -> bool:
        """Whether sampling records each step's mean (the KL trust regions and RatioNorm measure the trained step
        against it)."""
        return self.trust_region != "clip" or self.ratio_norm

    def _check(self, c: Checks, num_processes: int, check_environment: bool) -> None:
        super()._check(c, num_processes, check_environment)
        c.positive("train_adv_clip_max")
        c.positive("train_clip_range", "set train_clip_range > 0 (the paper uses 1e-4)")
        c.positive("trust_region_coef")
        c.positive("trust_region_max_kl")
        region = self.trust_region
        c.unchanged_unless(region == "clip", "train_clip_range", f"with trust_region={region!r} (no ratio clipping)")
        c.unchanged_unless(region == "kl_penalty", "trust_region_coef", f"with trust_region={region!r}")
        c.unchanged_unless(region == "kl_mask", "trust_region_max_kl", f"with trust_region={region!r}")
        if c.ok("ratio_norm", "trust_region") and self.ratio_norm and region != "clip":
            c.add("ratio_norm", f"normalises the ratio that PPO clips; trust_region={region!r} does not clip it",
                  "use trust_region=clip with ratio_norm, or remove ratio_norm")
        c.unchanged_unless(self.ratio_norm, "ratio_norm_reweight", "without ratio_norm")


@dataclasses.dataclass
class GroupSection(ConfigBase):
    """Several samples per prompt, each advantage measured against its group."""

    group_size: int = option(8, trl=False, resume=SHAPES,
                             help="Images sampled per prompt (one group); each image's advantage is its reward "
                                  "against its group's mean and std.")
    adv_std: AdvantageStd = option("group", trl=False, resume=OBJECTIVE,
                                   help="Divide the centred rewards by each group's std ('group', GRPO) or by the "
                                        "std of the whole epoch ('global', Flow-GRPO's global_std). Formerly "
                                        "nft_advantage_std in NFT.")
