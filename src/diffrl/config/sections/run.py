"""The run section: names, folders, records, trackers, checkpoints, evaluation and the Hub (every trainer)."""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional

from diffrl.config._base import APPLY, Checks, ConfigBase, option
from diffrl.config._types import suggest
from diffrl.config.accelerate_settings import (
    PROJECT_CONFIGURATION_KEYS,
    TRACKER_PACKAGES,
    TRACKERS,
    installed,
    project_configuration_kwargs,
)
from diffrl.config.resume import RNG, RUN_FOLDER

__all__ = ["RunSection", "default_exp_name"]


def default_exp_name() -> str:
    """The running script's file name without ``.py`` (TRL cut the last three characters blindly)."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return script.removesuffix(".py")


@dataclasses.dataclass
class RunSection(ConfigBase):
    """Where a run lives and what it records; nothing here changes what is trained."""

    exp_name: str = option(factory=default_exp_name, resume=APPLY,
                           help="Name of this experiment (by default the script's file name without .py).")
    run_name: str = option("", resume=RUN_FOLDER, help="Name of this run: the folder logdir/<run_name>. Empty: the "
                                                       "trainer picks a timestamped name.")
    seed: int = option(0, resume=RNG, help="Random seed.")
    log_with: Optional[str] = option(None, resume=APPLY,
                                     help="Tracker, through accelerate: " + ", ".join(TRACKER_PACKAGES)
                                          + ", or 'all' (every installed one); null: console and files only.")
    tracker_kwargs: dict = option(factory=dict, resume=APPLY,
                                  help="Keyword arguments for the tracker's init (accelerate init_kwargs, e.g. "
                                       "{wandb: {entity: me}}).")
    accelerator_kwargs: dict = option(factory=dict, resume=APPLY, help="Keyword arguments for the accelerator.")
    project_kwargs: dict = option(factory=dict, resume=APPLY,
                                  help="Keyword arguments for accelerate's ProjectConfiguration (project_dir, "
                                       "logging_dir, automatic_checkpoint_naming, total_limit, ...). "
                                       "project_dir/logging_dir default to the run folder.")
    tracker_project_name: str = option("diffrl", resume=APPLY,
                                       help="Name of project to use for tracking (TRL's default was 'trl'); each "
                                            "tracker's run is named after the run folder unless tracker_kwargs "
                                            "names it.")
    logdir: str = option("logs", resume=RUN_FOLDER, help="Top-level logging directory for checkpoint saving.")
    num_epochs: int = option(100, resume=APPLY, help="Number of epochs to train.")
    save_freq: int = option(1, resume=APPLY, help="Number of epochs between saving model checkpoints.")
    num_checkpoint_limit: int = option(5, resume=APPLY,
                                       help="Number of checkpoints to keep before deleting the oldest.")
    allow_tf32: bool = option(True, resume=APPLY, help="Allow tf32 on Ampere GPUs.")
    resume_from: str = option("", resume=APPLY, help="Resume training from a checkpoint folder, or from the newest "
                                                     "checkpoint of a run folder.")
    push_to_hub: bool = option(False, resume=APPLY,
                               help="Push the final model to the Hub (token from HF_TOKEN, never logged).")

    # ---- diffrl extras ----
    eval_every: int = option(0, trl=False, resume=APPLY, help="Evaluate on fixed seeds every N epochs (0: never).")
    eval_num_samples: int = option(64, trl=False, resume=APPLY, help="Number of samples per evaluation.")
    eval_seed: int = option(650, trl=False, resume=APPLY,
                            help="Seed of the evaluation noise (the same samples every time).")
    eval_num_steps: int = option(0, trl=False, resume=APPLY,
                                 help="Sampler steps of evaluation (0: sample_num_steps); train with few steps, "
                                      "evaluate with many.")
    eval_prompts: Optional[str] = option(
        None, trl=False, resume=APPLY,
        help="A held-out prompt source for training-time evaluation (any prompts: value, e.g. jsonl or "
             "my_pkg.prompts:heldout), drawn once with eval_seed. null: eval_num_samples draws of the training "
             "prompts.")
    eval_prompt_options: dict = option(factory=dict, trl=False, resume=APPLY,
                                       help="Keyword arguments for the eval_prompts source.")
    eval_rewards: dict = option(
        factory=dict, trl=False, resume=APPLY,
        help="Held-out rewards scored on every training-time evaluation's images, logged as eval/heldout/<name>: a "
             "mapping reward (a name or package.module:function) -> its options (or null), e.g. "
             "{jpeg_compressibility: null, aesthetic: {dtype: bfloat16}}; a reward rising while they fall is being "
             "hacked (needs eval_every > 0).")
    stop_below: dict = option(
        factory=dict, trl=False, resume=APPLY,
        help="Stop the run, with the reason, when an evaluation metric falls below a threshold: e.g. "
             "{eval/diversity: 0.05} stops a run collapsing onto one image (needs eval_every > 0). The epoch's "
             "checkpoint and metrics are written first; the final model is saved as after the last epoch.")
    stop_above: dict = option(factory=dict, trl=False, resume=APPLY,
                              help="As stop_below, for metrics that rise past a threshold: e.g. "
                                   "{eval/dark_fraction: 0.5}.")
    keep_best: bool = option(False, trl=False, resume=APPLY,
                             help="Also keep the checkpoint with the best evaluation reward (needs eval_every > 0).")
    output_dir: str = option("", trl=False, resume=APPLY,
                             help="Folder of the final model (what TRL's scripts pass to save_model). Empty: "
                                  "<run folder>/final.")
    hub_model_id: Optional[str] = option(None, trl=False, resume=APPLY,
                                         help="Hub repo that push_to_hub uploads to (user/name). null: the run name.")
    hub_private: bool = option(False, trl=False, resume=APPLY, help="Create the Hub repo as private.")

    def project_configuration_kwargs(self, run_dir: str | os.PathLike) -> dict:
        """``ProjectConfiguration(**config.project_configuration_kwargs(run_dir))``: ``project_kwargs`` with
        ``project_dir``/``logging_dir`` defaulting to the run folder (the user's win)."""
        return project_configuration_kwargs(self.project_kwargs, run_dir)

    def final_dir(self, run_dir: str | os.PathLike) -> str:
        """Where the final model goes: ``output_dir``, or ``<run_dir>/final``."""
        return self.output_dir or os.path.join(run_dir, "final")

    def hub_repo_id(self, run_name: str) -> str:
        """The repo ``push_to_hub`` uploads to: ``hub_model_id``, or the run name."""
        return self.hub_model_id or run_name

    def _check(self, c: Checks, num_processes: int, check_environment: bool) -> None:
        super()._check(c, num_processes, check_environment)
        if c.ok("run_name") and (os.sep in self.run_name or "/" in self.run_name or self.run_name in (".", "..")):
            c.add("run_name", "must be a plain folder name (it becomes logdir/<run_name>)",
                  "drop the slashes; put the parent folder in logdir")
        if c.ok("logdir") and not self.logdir:
            c.add("logdir", "must not be empty", "set logdir to a folder, e.g. logs")
        c.one_of("log_with", TRACKERS, f"use one of {', '.join(TRACKER_PACKAGES)}, all, or null for no tracker")
        for name in ("num_epochs", "save_freq", "num_checkpoint_limit"):
            c.at_least(name, 1)
        c.at_least("eval_every", 0)
        c.at_least("eval_num_samples", 1)
        c.at_least("eval_num_steps", 0)
        if c.ok("eval_rewards"):
            for key, value in self.eval_rewards.items():
                if not isinstance(key, str) or not key:
                    c.add(f"eval_rewards.{key}", "must be a reward name", "e.g. eval_rewards={jpeg_compressibility: "
                          "null}", value=value)
                elif value is not None and not isinstance(value, dict):
                    c.add(f"eval_rewards.{key}", "must be the reward's options (a mapping) or null",
                          f"e.g. eval_rewards.{key}=null", value=value)
            if self.eval_rewards and c.ok("eval_every") and self.eval_every == 0:
                c.add("eval_rewards", "needs evaluations to score", "set eval_every to 1 or more")
        for name in ("stop_below", "stop_above"):
            if not c.ok(name):
                continue
            for key, value in getattr(self, name).items():
                if not str(key).startswith("eval/"):
                    c.add(f"{name}.{key}", "is not an evaluation metric", "use an eval/... metric (eval/diversity, "
                          "eval/reward_mean, eval/brightness, eval/dark_fraction, ...)", value=value)
                elif isinstance(value, bool) or not isinstance(value, (int, float)):
                    c.add(f"{name}.{key}", "must be a number (the threshold)", f"e.g. {name}.{key}=0.05",
                          value=value)
            if getattr(self, name) and c.ok("eval_every") and self.eval_every == 0:
                c.add(name, "needs evaluations to watch", "set eval_every to 1 or more")
        if c.ok("eval_prompts") and self.eval_prompts == "":
            c.add("eval_prompts", "must not be empty", "name a prompt source, or null to evaluate on training prompts")
        c.unchanged_unless(self.eval_prompts is not None, "eval_prompt_options", "without eval_prompts")
        if self.keep_best and c.ok("eval_every") and self.eval_every == 0:
            c.add("keep_best", "needs evaluations to rank checkpoints", "set eval_every to 1 or more")
        if c.ok("hub_model_id") and self.hub_model_id is not None and self.hub_model_id.count("/") > 1:
            c.add("hub_model_id", "is not a repo id", "write it as name or user/name")
        packages = TRACKER_PACKAGES.get(self.log_with or "")
        if check_environment and c.ok("log_with") and packages and not any(installed(m) for m in packages):
            c.add("log_with", f"needs the {packages[0]} package", f"pip install {packages[0]}")
        if c.ok("project_kwargs"):
            for key in self.project_kwargs:
                if key not in PROJECT_CONFIGURATION_KEYS:
                    close = suggest(str(key), PROJECT_CONFIGURATION_KEYS)
                    c.add(f"project_kwargs.{key}", "is not a field of accelerate's ProjectConfiguration",
                          f"did you mean {close!r}?" if close else f"use {', '.join(PROJECT_CONFIGURATION_KEYS)}",
                          value=self.project_kwargs[key])
