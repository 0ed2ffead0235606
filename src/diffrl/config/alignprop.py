"""AlignPropConfig: TRL 0.23's fields and defaults, plus DRaFT, ReFL and the reward scale."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

from diffrl.config._base import APPLY, Checks, option
from diffrl.config.resume import OBJECTIVE
from diffrl.config.shared import PairAction, SharedConfig

__all__ = ["AlignPropConfig", "Truncation"]

Truncation = Literal["fixed", "random", "draft_k", "draft_lv", "refl"]


@dataclasses.dataclass
class AlignPropConfig(SharedConfig):
    """Configuration of ``AlignPropTrainer``; every TRL 0.23 ``AlignPropConfig`` field with its default.

    Which sampler steps carry gradients is one choice, :attr:`truncation_strategy`:

    * ``truncation: null`` (the default) keeps TRL's behaviour: ``truncated_backprop_rand=True``
      means ``"random"`` (a step index drawn from ``truncated_rand_backprop_minmax`` per batch;
      the steps from it on carry gradients), ``False`` means ``"fixed"`` (the steps from
      ``truncated_backprop_timestep`` on; the default 49 of 50 is K=1).
    * An explicit ``truncation`` wins and ``truncated_backprop_rand`` is not read. Setting
      ``truncated_backprop_rand: false`` (TRL's request for fixed truncation) with any
      ``truncation`` but ``"fixed"`` is a contradiction and fails validation, as does
      setting a truncation parameter that the chosen strategy does not use.
    * ``"draft_k"``: only the last ``draft_k`` steps (DRaFT-K); ``"draft_lv"``: the last step,
      with ``draft_lv_draws`` noise draws (DRaFT-LV); ``"refl"``: stop at a random step in
      ``[refl_min_step, refl_max_step]`` and score the one-step prediction of the clean image (ReFL).

    Step indices count sampler steps in sampling order, 0 to ``sample_num_steps - 1``.
    """

    # ---- TRL 0.23 AlignProp fields (and the defaults in which it differs from DDPO) ----
    train_learning_rate: float = option(1e-3, resume=APPLY,
                                        help="Learning rate (the peak rate of a warmup or decay schedule).")
    negative_prompts: Optional[str] = option(None, resume=APPLY,
                                             help="Comma-separated list of prompts to use as negative "
                                                  "examples (write \\, for a comma inside a prompt).")
    log_image_freq: int = option(1, resume=APPLY, help="Call the image hook every this many optimizer steps.")
    truncated_backprop_rand: bool = option(True, resume=APPLY,
                                           help="If true, randomized truncation to different diffusion "
                                                "timesteps is used (when truncation is null).")
    truncated_backprop_timestep: int = option(49, resume=APPLY,
                                              help="Step index from which gradients are backpropagated, for "
                                                   "fixed truncation.")
    truncated_rand_backprop_minmax: tuple[int, int] = option(
        (0, 50), resume=APPLY,
        help="Range [min, max] of the step index drawn for randomized truncation: --truncated_rand_backprop_minmax "
             "0 10, or truncated_rand_backprop_minmax=[0,10].",
        nargs=2, metavar=("MIN", "MAX"), action=PairAction)

    # ---- diffrl extras ----
    truncation: Optional[Truncation] = option(
        None, trl=False, resume=OBJECTIVE,
        help="Which steps carry gradients: 'fixed', 'random', 'draft_k', 'draft_lv' or 'refl'. null: TRL's choice "
             "('random' if truncated_backprop_rand else 'fixed').")
    draft_k: int = option(1, resume=APPLY, trl=False, help="DRaFT-K: number of final steps that carry gradients.")
    draft_lv_draws: int = option(2, resume=APPLY, trl=False, help="DRaFT-LV: noise draws at the last step.")
    refl_min_step: int = option(40, resume=APPLY, trl=False, help="ReFL: earliest step index to stop at.")
    refl_max_step: int = option(49, resume=APPLY, trl=False, help="ReFL: latest step index to stop at.")
    reward_coefficient: float = option(1.0, trl=False, resume=OBJECTIVE,
                                       help="The loss is -reward_coefficient * reward (TRL "
                                            "hard-coded 10 - reward).")
    gradient_checkpointing: bool = option(True, resume=APPLY, trl=False,
                                          help="Recompute each UNet call in the backward pass "
                                               "(memory does not grow with the steps kept).")
    train_micro_batch_chunk: int = option(
        0, trl=False, resume=APPLY,
        help="Micro-batches of an optimizer step sampled and backpropagated as one chain when their truncation "
             "plans are equal (the same gradient as one chain each; memory grows with it). 0: automatic (all of "
             "them on the CPU; 1 on an accelerator, where accumulation is there to bound memory). 1: one chain "
             "per micro-batch, as TRL.")

    def samples_per_epoch(self, num_processes: int = 1) -> int:
        """Samples drawn (and scored) per epoch over all processes: one optimizer step of micro-batches."""
        return self.train_batch_size * self.train_gradient_accumulation_steps * num_processes

    @property
    def truncation_strategy(self) -> Truncation:
        """The strategy in effect: ``truncation``, or TRL's choice when it is null."""
        if self.truncation is not None:
            return self.truncation
        return "random" if self.truncated_backprop_rand else "fixed"

    def _check(self, c: Checks, num_processes: int, check_environment: bool) -> None:
        super()._check(c, num_processes, check_environment)
        c.at_least("log_image_freq", 1)
        c.at_least("train_micro_batch_chunk", 0)
        if not c.ok("truncation", "truncated_backprop_rand", "sample_num_steps"):
            return
        strategy, steps, explicit = self.truncation_strategy, self.sample_num_steps, self.truncation is not None
        if explicit and self.truncated_backprop_rand is False and strategy != "fixed":
            c.add("truncated_backprop_rand", f"false asks for fixed truncation, but truncation={strategy!r}",
                  "remove truncated_backprop_rand (truncation decides), or set truncation=fixed")
        if strategy == "fixed":
            c.between("truncated_backprop_timestep", 0, steps, high_open=True,
                      fix=f"use a step index below sample_num_steps={steps}, e.g. {steps - 1} for K=1")
        elif strategy == "random":
            self._check_minmax(c, steps)
        elif strategy == "draft_k":
            c.between("draft_k", 1, steps, fix=f"set draft_k between 1 and sample_num_steps={steps}")
        elif strategy == "draft_lv":
            c.at_least("draft_lv_draws", 1)
        elif strategy == "refl":
            c.between("refl_min_step", 0, steps, high_open=True,
                      fix=f"use a step index below sample_num_steps={steps}")
            c.between("refl_max_step", 0, steps, high_open=True,
                      fix=f"use a step index below sample_num_steps={steps}, e.g. {steps - 1}")
            if c.ok("refl_min_step", "refl_max_step") and self.refl_min_step > self.refl_max_step:
                c.add("refl_min_step", f"is above refl_max_step={self.refl_max_step}",
                      "set refl_min_step <= refl_max_step")
        why = f"with truncation={strategy!r}"
        if explicit:  # with truncation null, TRL's fields behave as in TRL (unused ones are ignored)
            c.unchanged_unless(strategy == "fixed", "truncated_backprop_timestep", why)
            c.unchanged_unless(strategy == "random", "truncated_rand_backprop_minmax", why)
        c.unchanged_unless(strategy == "draft_k", "draft_k", why)
        c.unchanged_unless(strategy == "draft_lv", "draft_lv_draws", why)
        c.unchanged_unless(strategy == "refl", "refl_min_step", why)
        c.unchanged_unless(strategy == "refl", "refl_max_step", why)
        if c.ok("reward_coefficient") and self.reward_coefficient == 0:
            c.add("reward_coefficient", "makes the loss constant (no gradient)",
                  "use a nonzero value (1.0; negative values minimise the reward)")

    def _check_minmax(self, c: Checks, steps: int) -> None:
        if not c.ok("truncated_rand_backprop_minmax"):
            return
        low, high = self.truncated_rand_backprop_minmax
        if 0 <= low < high <= steps:
            return
        problem = f"needs 0 <= min < max <= sample_num_steps={steps}"
        if 0 <= low < high and high > steps:
            problem += f"; {trl_truncation_note(low, high, steps)}"
        c.add("truncated_rand_backprop_minmax", problem,
              f"set the range inside the {steps} steps: truncated_rand_backprop_minmax=[{min(low, steps - 1)},{steps}] "
              f"in YAML or as an override, --truncated_rand_backprop_minmax {min(low, steps - 1)} {steps} on the "
              "command line (also in TRL's example scripts)")


def trl_truncation_note(low: int, high: int, steps: int) -> str:
    """What TRL 0.23 does with a randomized-truncation range that reaches past the last step.

    TRL's ``pipeline_step_with_grad`` draws ``random.randint(low, high)`` (inclusive) afresh at every
    step ``i`` and detaches that step's UNet output unless ``i >= draw``.
    """
    values = high - low + 1
    carry = [max(0, min(i, high) - low + 1) / values for i in range(steps)]  # P(draw <= i) per step
    none = math.prod(1 - p for p in carry)
    return (f"TRL 0.23 accepted this silently: it draws randint({low}, {high}) anew at every step and "
            f"backpropagates step i only when the draw is <= i, so the {max(0, high - steps + 1)} of {values} "
            f"draws at or above {steps} never reach a step; a batch got gradients through {sum(carry):.1f} of "
            f"{steps} steps on average and {none:.0%} of batches trained on nothing")
