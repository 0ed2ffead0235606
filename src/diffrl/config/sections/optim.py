"""The optimisation section: batches of an update, Adam, clipping and the learning-rate schedule (every trainer)."""

from __future__ import annotations

import dataclasses

from diffrl.config._base import APPLY, Checks, ConfigBase, option
from diffrl.config.accelerate_settings import installed
from diffrl.config.resume import OPTIMIZER, SCHEDULE, SHAPES
from diffrl.config.schedule import WARMUP_SCHEDULES, LRSchedule, ScheduleName

__all__ = ["OptimSection"]


@dataclasses.dataclass
class OptimSection(ConfigBase):
    """How each optimizer step is made."""

    train_batch_size: int = option(1, resume=SHAPES, help="Batch size (per GPU) to use for training.")
    train_use_8bit_adam: bool = option(False, resume=OPTIMIZER, help="Use 8bit Adam optimizer from bitsandbytes.")
    train_learning_rate: float = option(3e-4, resume=APPLY,
                                        help="Learning rate (the peak rate of a warmup or decay schedule).")
    train_adam_beta1: float = option(0.9, resume=APPLY, help="Adam beta1.")
    train_adam_beta2: float = option(0.999, resume=APPLY, help="Adam beta2.")
    train_adam_weight_decay: float = option(1e-4, resume=APPLY, help="Adam weight decay.")
    train_adam_epsilon: float = option(1e-8, resume=APPLY, help="Adam epsilon.")
    train_gradient_accumulation_steps: int = option(1, resume=SHAPES, help="Number of gradient accumulation steps.")
    train_max_grad_norm: float = option(1.0, resume=APPLY, infinite=True,
                                        help="Maximum gradient norm for gradient clipping (.inf: no clipping).")

    # ---- diffrl extras ----
    lr_scheduler: ScheduleName = option(
        "constant", trl=False, resume=SCHEDULE,
        help="A diffusers schedule (constant, constant_with_warmup, linear, cosine, cosine_with_restarts, "
             "polynomial; with lr_warmup_steps), or 'warmup_cosine': linear warmup from lr_initial to "
             "train_learning_rate, then cosine decay (as in ddpo-celebahq).")
    lr_warmup_steps: int = option(0, trl=False, resume=SCHEDULE,
                                  help="Optimizer steps of linear warmup (schedules with warmup).")
    lr_warmup_fraction: float = option(0.0, trl=False, resume=SCHEDULE,
                                       help="Warmup as a fraction of all optimizer steps, instead of lr_warmup_steps.")
    lr_initial: float = option(0.0, trl=False, resume=SCHEDULE,
                               help="Learning rate at step 0 of the warmup (warmup_cosine only).")
    lr_num_cycles: int = option(1, trl=False, resume=SCHEDULE,
                                help="Number of hard restarts (cosine_with_restarts only).")
    lr_power: float = option(1.0, trl=False, resume=SCHEDULE, help="Power of the polynomial decay (polynomial only).")

    def lr_schedule(self, total_steps: int) -> LRSchedule:
        """The learning-rate schedule of a run of ``total_steps`` optimizer steps."""
        warmup = self.lr_warmup_steps or int(round(self.lr_warmup_fraction * total_steps))
        return LRSchedule(self.lr_scheduler, min(warmup, total_steps), total_steps,
                          self.lr_initial / self.train_learning_rate, self.lr_num_cycles, self.lr_power)

    def _check(self, c: Checks, num_processes: int, check_environment: bool) -> None:
        super()._check(c, num_processes, check_environment)
        c.at_least("train_batch_size", 1)
        c.at_least("train_gradient_accumulation_steps", 1)
        c.positive("train_learning_rate")
        c.between("train_adam_beta1", 0.0, 1.0, high_open=True)
        c.between("train_adam_beta2", 0.0, 1.0, high_open=True)
        c.at_least("train_adam_weight_decay", 0.0)
        c.positive("train_adam_epsilon")
        c.positive("train_max_grad_norm")
        self._check_schedule(c)
        if check_environment and self.train_use_8bit_adam is True and not installed("bitsandbytes"):
            c.add("train_use_8bit_adam", "needs the bitsandbytes package",
                  "pip install 'diffrl[bnb]', or set train_use_8bit_adam=false")

    def _check_schedule(self, c: Checks) -> None:
        schedule, warms = self.lr_scheduler, self.lr_scheduler in WARMUP_SCHEDULES
        why = f"with lr_scheduler={schedule!r}"
        if warms:
            c.at_least("lr_warmup_steps", 0)
            c.between("lr_warmup_fraction", 0.0, 1.0)
            if c.ok("lr_warmup_steps", "lr_warmup_fraction") and self.lr_warmup_steps and self.lr_warmup_fraction:
                c.add("lr_warmup_fraction", f"and lr_warmup_steps={self.lr_warmup_steps} both set the warmup",
                      "set only one of the two")
        for name in ("lr_warmup_steps", "lr_warmup_fraction"):
            c.unchanged_unless(warms, name, why)
        if schedule == "warmup_cosine":
            c.at_least("lr_initial", 0.0)
            if c.ok("lr_initial", "train_learning_rate") and self.lr_initial > self.train_learning_rate:
                c.add("lr_initial", f"is above the peak rate train_learning_rate={self.train_learning_rate}",
                      "set lr_initial <= train_learning_rate (warmup goes up)")
        c.unchanged_unless(schedule == "warmup_cosine", "lr_initial", why)
        if schedule == "cosine_with_restarts":
            c.at_least("lr_num_cycles", 1)
        c.unchanged_unless(schedule == "cosine_with_restarts", "lr_num_cycles", why)
        if schedule == "polynomial":
            c.positive("lr_power")
        c.unchanged_unless(schedule == "polynomial", "lr_power", why)
