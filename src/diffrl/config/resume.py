"""Resuming with changed settings: which differences can be applied mid-run, which are refused, and why.

:func:`diff_for_resume` is pure: it compares the run's recorded config with the new one and
classifies every differing field. The recipe refuses the run when ``diff.refused`` is not
empty (``diff.raise_if_refused()``), applies ``diff.applied`` for real (a new learning rate
must reach the optimizer's param groups) and records the new config beside the old one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from diffrl.config._errors import ConfigError, Violation
from diffrl.config.secrets import REDACTED

__all__ = ["APPLIED", "REFUSED", "ResumeChange", "ResumeDiff", "diff_for_resume"]

_SHAPES = "it changes the shapes of what the checkpoint holds or of an epoch, so the run could not continue exactly"
_MODEL = "the checkpoint's weights belong to the run's model and trainable modules"
_RNG = "the restored random state continues the run's own seed; a new seed would not reproduce either run"
_OBJECTIVE = "the run's rewards, advantages and checkpoints would mix two objectives"
_SCHEDULE = "the restored scheduler state (its step count and shape) belongs to the run's schedule"
_OPTIMIZER = "the restored optimizer state belongs to the run's optimizer"
_VAE = "the run's samples, and so its rewards, were decoded by the run's VAE"
_CONDITIONING = "the UNet was trained under the run's SDXL size conditioning (add_time_ids)"

REFUSED: dict[str, str] = {
    "model": _MODEL, "model_revision": _MODEL, "train_lora": _MODEL, "lora_rank": _MODEL, "lora_alpha": _MODEL,
    "lora_target_modules": _MODEL, "algorithm": _OBJECTIVE, "truncation": _OBJECTIVE, "reward": _OBJECTIVE,
    "reward_options": _OBJECTIVE, "reward_coefficient": _OBJECTIVE, "prompts": _OBJECTIVE,
    "prompt_options": _OBJECTIVE, "seed": _RNG, "sample_batch_size": _SHAPES, "train_batch_size": _SHAPES,
    "sample_num_batches_per_epoch": _SHAPES, "train_gradient_accumulation_steps": _SHAPES,
    "sample_num_steps": _SHAPES, "train_timestep_fraction": _SHAPES, "train_cfg": _SHAPES,
    "per_prompt_stat_tracking": _OBJECTIVE, "per_prompt_stat_tracking_buffer_size": _SHAPES,
    "per_prompt_stat_tracking_min_count": _OBJECTIVE, "train_use_8bit_adam": _OPTIMIZER,
    "mixed_precision": "the gradient scaler and the weights' dtype belong to the run's precision",
    "lr_scheduler": _SCHEDULE, "lr_warmup_steps": _SCHEDULE, "lr_warmup_fraction": _SCHEDULE,
    "lr_initial": _SCHEDULE, "lr_num_cycles": _SCHEDULE, "lr_power": _SCHEDULE,
    "sample_height": _SHAPES, "sample_width": _SHAPES, "vae": _VAE, "sdxl_original_size": _CONDITIONING,
    "sdxl_target_size": _CONDITIONING, "sdxl_crops_coords_top_left": _CONDITIONING,
    "logdir": "the run folder holds the checkpoints being resumed", "run_name": "the run folder holds the "
    "checkpoints being resumed",
}
"""Fields that cannot change mid-run -> why."""

APPLIED: frozenset[str] = frozenset({
    "train_learning_rate", "train_adam_beta1", "train_adam_beta2", "train_adam_weight_decay", "train_adam_epsilon",
    "train_max_grad_norm", "train_clip_range", "train_adv_clip_max", "train_num_inner_epochs", "num_epochs",
    "save_freq", "num_checkpoint_limit", "eval_every", "eval_num_samples", "eval_seed", "keep_best", "log_with",
    "tracker_kwargs", "tracker_project_name", "accelerator_kwargs", "project_kwargs", "allow_tf32",
    "push_to_hub", "hub_model_id", "hub_private", "output_dir", "exp_name", "sample_eta", "sample_guidance_scale",
    "negative_prompts", "async_reward_computation", "max_workers", "log_image_freq", "rwr_temperature",
    "rwr_sparse_percentile", "truncated_backprop_rand", "truncated_backprop_timestep",
    "truncated_rand_backprop_minmax", "draft_k", "draft_lv_draws", "refl_min_step", "refl_max_step",
    "gradient_checkpointing",
})
"""Fields that may change on resume; the recipe applies the new value from the resumed epoch on."""

_NOT_COMPARED = frozenset({"resume_from"})


class ResumeChange(NamedTuple):
    """One field that differs between the checkpoint's run and the resumed one."""

    field: str
    old: Any
    new: Any
    applied: bool
    reason: str
    """Why it is refused ("" when applied)."""


class ResumeDiff(NamedTuple):
    """Every difference, split into what the recipe applies and what it must refuse."""

    applied: list[ResumeChange]
    refused: list[ResumeChange]

    def raise_if_refused(self, checkpoint: str = "the checkpoint") -> None:
        """A :class:`ConfigError` naming each refused field, its two values and the way out."""
        if self.refused:
            raise ConfigError([Violation(c.field, c.new, f"differs from {checkpoint}'s run ({c.old!r}); it cannot "
                                         f"change mid-run: {c.reason}",
                                         f"keep {c.field}={c.old!r} to resume, or start a new run without resume_from")
                               for c in self.refused], "resume")


def diff_for_resume(recorded: Any, new: Any) -> ResumeDiff:
    """Compare the run's config (``recorded``, e.g. read back from its ``config.yaml``) with ``new``.

    A different config class (another trainer) is refused as ``trainer``. Values the record
    holds redacted (``***``) are not compared. Fields of neither table (a new trainer's) are
    refused unless the class lists them in ``resume_applied``, since nothing says they are safe.
    """
    if type(recorded) is not type(new):
        change = ResumeChange("trainer", type(recorded).__name__, type(new).__name__, False,
                              "the checkpoint holds another trainer's state")
        return ResumeDiff([], [change])
    applied_here = APPLIED | getattr(type(new), "resume_applied", frozenset())
    applied, refused = [], []
    for f in dataclasses.fields(new):
        old, value = getattr(recorded, f.name), getattr(new, f.name)
        if f.name in _NOT_COMPARED or old == value or old == REDACTED:
            continue
        if isinstance(old, dict) and isinstance(value, dict) and REDACTED in old.values():
            if {k: v for k, v in old.items() if v != REDACTED} == {k: v for k, v in value.items() if old.get(k)
                                                                      != REDACTED}:
                continue
        if f.name in applied_here and f.name not in REFUSED:
            applied.append(ResumeChange(f.name, old, value, True, ""))
        else:
            reason = REFUSED.get(f.name, "diffrl does not know that it can change mid-run")
            refused.append(ResumeChange(f.name, old, value, False, reason))
    return ResumeDiff(applied, refused)
