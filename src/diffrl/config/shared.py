"""Fields and rules that DDPOConfig and AlignPropConfig have in common.

The TRL fields keep TRL 0.23's names, types and defaults exactly (where the two TRL
classes differ, e.g. ``train_learning_rate``, the subclass redeclares the field).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import sys
from typing import Any, Optional

from diffrl.config import registry
from diffrl.config._base import Checks, ConfigBase, option
from diffrl.config._errors import ConfigError, Violation
from diffrl.config._types import suggest
from diffrl.config.accelerate_settings import (
    MIXED_PRECISION,
    PROJECT_CONFIGURATION_KEYS,
    TRACKER_PACKAGES,
    TRACKERS,
    Precision,
    has_accelerator_device,
    project_configuration_kwargs,
    resolve_mixed_precision,
)
from diffrl.config.schedule import WARMUP_SCHEDULES, LRSchedule, ScheduleName
from diffrl.config.secrets import env_references, resolve_env

__all__ = ["RENAMED", "SDXL_SIZE_FIELDS", "SIZE_FIELDS", "VAE_FACTOR", "SharedConfig", "default_exp_name",
           "split_prompts"]

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
RENAMED = {"use_lora": "train_lora", "compile_unet": "compile_model"}
"""Old field name -> new one. ``use_lora`` clashed with the ``use_lora`` of TRL's example scripts'
``ScriptArguments`` (HfArgumentParser refuses two fields of one name)."""
VAE_FACTOR = 8
"""Pixels per latent cell of the SD and SDXL VAEs (three 2x downsamplings); the built policy's own factor is
checked again when it is loaded (:func:`diffrl.build.check_policy_settings`)."""
SIZE_FIELDS = ("sample_height", "sample_width")
SDXL_SIZE_FIELDS = ("sdxl_original_size", "sdxl_target_size", "sdxl_crops_coords_top_left")
OPTION_FIELDS = ("reward_options", "prompt_options", "tracker_kwargs", "accelerator_kwargs", "project_kwargs")
"""Mapping fields whose string values may be ``${env:NAME}`` references."""


def default_exp_name() -> str:
    """The running script's file name without ``.py`` (TRL cut the last three characters blindly)."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return script.removesuffix(".py")


def split_prompts(text: Optional[str]) -> list[str]:
    """Split a comma-separated prompt list; ``\\,`` is a literal comma, blanks are dropped."""
    if not text:
        return []
    parts = re.split(r"(?<!\\),", text)
    return [p.replace("\\,", ",").strip() for p in parts if p.strip()]


class PairAction(argparse.Action):
    """``--sdxl_original_size 512 512`` or ``--truncated_rand_backprop_minmax 0 10`` through HfArgumentParser, which
    hands argparse the field's type (``tuple[int, int]``) as the converter of each word: that splits a word into its
    characters, which this action joins back and reads as an int."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        words = ["".join(v) if isinstance(v, tuple) else str(v) for v in values]
        try:
            pair = tuple(int(w) for w in words)
        except ValueError:
            names = " ".join(self.metavar) if isinstance(self.metavar, tuple) else "A B"
            parser.error(f"{option_string} takes two integers {names}, got {' '.join(words)}")
        setattr(namespace, self.dest, pair)


def _pair_option(default: Any, help: str) -> Any:
    return option(default, trl=False, help=help, nargs=2, metavar=("HEIGHT", "WIDTH"), action=PairAction)


@dataclasses.dataclass
class SharedConfig(ConfigBase):
    """Fields common to both trainers; not used on its own."""

    # ---- TRL 0.23 fields (both DDPOConfig and AlignPropConfig) ----
    exp_name: str = option(factory=default_exp_name,
                           help="Name of this experiment (by default the script's file name without .py).")
    run_name: str = option("", help="Name of this run: the folder logdir/<run_name>. Empty: the trainer picks "
                                    "a timestamped name.")
    seed: int = option(0, help="Random seed.")
    log_with: Optional[str] = option(None, help="Tracker, through accelerate: " + ", ".join(TRACKER_PACKAGES)
                                                + ", or 'all' (every installed one); null: console and files only.")
    tracker_kwargs: dict = option(factory=dict, help="Keyword arguments for the tracker's init "
                                                     "(accelerate init_kwargs, e.g. {wandb: {entity: me}}).")
    accelerator_kwargs: dict = option(factory=dict, help="Keyword arguments for the accelerator.")
    project_kwargs: dict = option(factory=dict, help="Keyword arguments for accelerate's ProjectConfiguration "
                                                     "(project_dir, logging_dir, automatic_checkpoint_naming, "
                                                     "total_limit, ...). project_dir/logging_dir default to the "
                                                     "run folder.")
    tracker_project_name: str = option("trl", help="Name of project to use for tracking.")
    logdir: str = option("logs", help="Top-level logging directory for checkpoint saving.")
    num_epochs: int = option(100, help="Number of epochs to train.")
    save_freq: int = option(1, help="Number of epochs between saving model checkpoints.")
    num_checkpoint_limit: int = option(5, help="Number of checkpoints to keep before deleting the oldest.")
    mixed_precision: Optional[str] = option(
        None, help="'no', 'fp16' or 'bf16'. null: what `accelerate launch --mixed_precision` / accelerate's "
                   "config file say, else TRL's fp16 on a GPU and 'no' on a CPU.")
    allow_tf32: bool = option(True, help="Allow tf32 on Ampere GPUs.")
    resume_from: str = option("", help="Resume training from a checkpoint folder, or from the newest checkpoint "
                                       "of a run folder.")
    sample_num_steps: int = option(50, help="Number of sampler inference steps.")
    sample_eta: float = option(1.0, help="Eta parameter for the DDIM sampler (0: deterministic, 1: DDPM-like).")
    sample_guidance_scale: float = option(5.0, help="Classifier-free guidance weight.")
    train_batch_size: int = option(1, help="Batch size (per GPU) to use for training.")
    train_use_8bit_adam: bool = option(False, help="Use 8bit Adam optimizer from bitsandbytes.")
    train_learning_rate: float = option(3e-4, help="Learning rate (the peak rate of a warmup or decay schedule).")
    train_adam_beta1: float = option(0.9, help="Adam beta1.")
    train_adam_beta2: float = option(0.999, help="Adam beta2.")
    train_adam_weight_decay: float = option(1e-4, help="Adam weight decay.")
    train_adam_epsilon: float = option(1e-8, help="Adam epsilon.")
    train_gradient_accumulation_steps: int = option(1, help="Number of gradient accumulation steps.")
    train_max_grad_norm: float = option(1.0, help="Maximum gradient norm for gradient clipping (.inf: no clipping).")
    negative_prompts: str = option("", help="Comma-separated list of prompts to use as negative examples "
                                            "(write \\, for a comma inside a prompt).")
    push_to_hub: bool = option(False, help="Push the final model to the Hub (token from HF_TOKEN, never logged).")

    # ---- diffrl extras (both trainers) ----
    model: Optional[str] = option(None, trl=False, help="Model to fine-tune: a Hub id, a local diffusers folder or a "
                                                        "single .safetensors/.ckpt file. null: the embedded 8x8 "
                                                        "digits DDPM.")
    model_revision: str = option("main", trl=False, help="Hub revision (branch, tag or commit) of `model`.")
    train_lora: bool = option(True, trl=False, help="Train LoRA adapters (true) or the full UNet (false). "
                                                    "Formerly use_lora.")
    lora_rank: int = option(4, trl=False, help="LoRA rank.")
    lora_alpha: int = option(4, trl=False, help="LoRA alpha (the update is scaled by lora_alpha / lora_rank).")
    lora_target_modules: list[str] = option(factory=lambda: list(DEFAULT_LORA_TARGETS), trl=False,
                                            help="UNet modules that get LoRA adapters.")
    reward: Optional[str] = option(None, trl=False, help="Registered name of the reward function. null: the "
                                                         "model's default (the digit classifier for the digits DDPM).")
    reward_options: dict = option(factory=dict, trl=False,
                                  help="Keyword arguments for the reward (reward_options.KEY=VALUE on the command "
                                       "line). Credentials (token, api_key, password, URL user-info) are never "
                                       "written to files or trackers; give them as '${env:NAME}' to read the "
                                       "environment variable NAME instead.")
    prompts: Optional[str] = option(None, trl=False, help="Registered name of the prompt source. null: the model's "
                                                          "default (an empty prompt for an unconditional model).")
    prompt_options: dict = option(factory=dict, trl=False, help="Keyword arguments for the prompt source.")
    lr_scheduler: ScheduleName = option(
        "constant", trl=False,
        help="A diffusers schedule (constant, constant_with_warmup, linear, cosine, cosine_with_restarts, "
             "polynomial; with lr_warmup_steps), or 'warmup_cosine': linear warmup from lr_initial to "
             "train_learning_rate, then cosine decay (as in ddpo-celebahq).")
    lr_warmup_steps: int = option(0, trl=False, help="Optimizer steps of linear warmup (schedules with warmup).")
    lr_warmup_fraction: float = option(0.0, trl=False, help="Warmup as a fraction of all optimizer steps, instead "
                                                            "of lr_warmup_steps.")
    lr_initial: float = option(0.0, trl=False, help="Learning rate at step 0 of the warmup (warmup_cosine only).")
    lr_num_cycles: int = option(1, trl=False, help="Number of hard restarts (cosine_with_restarts only).")
    lr_power: float = option(1.0, trl=False, help="Power of the polynomial decay (polynomial only).")
    eval_every: int = option(0, trl=False, help="Evaluate on fixed seeds every N epochs (0: never).")
    eval_num_samples: int = option(64, trl=False, help="Number of samples per evaluation.")
    eval_seed: int = option(650, trl=False, help="Seed of the evaluation noise (the same samples every time).")
    keep_best: bool = option(False, trl=False, help="Also keep the checkpoint with the best evaluation reward "
                                                    "(needs eval_every > 0).")
    output_dir: str = option("", trl=False, help="Folder of the final model (what TRL's scripts pass to "
                                                 "save_model). Empty: <run folder>/final.")
    hub_model_id: Optional[str] = option(None, trl=False, help="Hub repo that push_to_hub uploads to "
                                                               "(user/name). null: the run name.")
    hub_private: bool = option(False, trl=False, help="Create the Hub repo as private.")
    sample_height: Optional[int] = option(
        None, trl=False, help="Height in pixels of the sampled (and trained) images, a multiple of 8 (the SD/SDXL "
                              "VAE factor), e.g. 512 for SDXL on a small GPU. null: the model's native size. Not "
                              "for unconditional DDPMs, whose size is fixed.")
    sample_width: Optional[int] = option(None, trl=False, help="Width in pixels of the sampled images; as "
                                                               "sample_height.")
    vae: Optional[str] = option(
        None, trl=False, help="A separate VAE replacing the model's (SD and SDXL): a folder, single file or Hub id, "
                              "e.g. madebyollin/sdxl-vae-fp16-fix, which decodes SDXL latents in fp16 without "
                              "overflowing. null: the model's own VAE.")
    sdxl_original_size: Optional[tuple[int, int]] = _pair_option(
        None, "SDXL only: the original_size (height, width) of the add_time_ids size conditioning (Podell et al. "
              "2023, sec. 2.2). null: the sampled image size.")
    sdxl_target_size: Optional[tuple[int, int]] = _pair_option(
        None, "SDXL only: the target_size (height, width) of add_time_ids. null: the sampled image size.")
    sdxl_crops_coords_top_left: tuple[int, int] = _pair_option(
        (0, 0), "SDXL only: the crop top-left (top, left) of add_time_ids; (0, 0) asks for centred, uncropped "
                "images.")
    gradient_checkpointing: bool = option(
        False, trl=False, help="Recompute the UNet's block activations in the backward pass of the training loss "
                               "instead of storing them (diffusers' UNet gradient checkpointing): less memory, "
                               "roughly a third more compute per update.")

    use_lora: dataclasses.InitVar[Optional[bool]] = None
    """Not a field: ``use_lora`` was renamed to ``train_lora``; passing it raises an error naming the new name."""

    may_be_infinite = frozenset({"train_max_grad_norm"})

    def __post_init__(self, use_lora: Optional[bool] = None) -> None:
        if use_lora is not None:
            raise ConfigError([_renamed("use_lora", use_lora)], type(self).__name__)
        super().__post_init__()

    # ---- the trainer choice (diffrl.config.registry) ----

    @classmethod
    def _select(cls, data: dict) -> tuple[dict, list[Violation]]:
        violations = [_renamed(old, data[old]) for old in RENAMED if old in data]
        for old in RENAMED:
            data.pop(old, None)
        spec, rest, more = registry.select(data)
        own = registry.spec_of(cls)
        if spec is not None and own is not None and spec is not own:
            more.append(Violation(registry.TRAINER_KEY, spec.name, f"selects {spec.config.rpartition(':')[2]}, "
                                  f"not {cls.__name__}", "load it with diffrl.config.load_config, which picks the "
                                  "class"))
        return rest, violations + more

    def _header(self) -> dict:
        spec = registry.spec_of(type(self))
        return {registry.TRAINER_KEY: spec.name} if spec else {}

    @classmethod
    def _elsewhere(cls, key: str) -> str:
        own = registry.spec_of(cls)
        for spec in registry.TRAINERS.values():
            if spec is not own and key in registry.config_class(spec.name).field_types():
                return f" (a field of {spec.config.rpartition(':')[2]}, selected by `trainer: {spec.name}`)"
        return ""

    # ---- what the run start asks of the config ----

    @property
    def negative_prompt_list(self) -> list[str]:
        """``negative_prompts`` split at commas (TRL documented the commas but never split them)."""
        return split_prompts(self.negative_prompts)

    def resolve_mixed_precision(self, environ: dict | None = None, gpu: bool | None = None) -> Precision:
        """The precision in force (see :func:`~diffrl.config.accelerate_settings.resolve_mixed_precision`);
        record it with ``dataclasses.replace(config, mixed_precision=precision.value)``."""
        return resolve_mixed_precision(self.mixed_precision, environ=environ, gpu=gpu)

    def project_configuration_kwargs(self, run_dir: str | os.PathLike) -> dict:
        """``ProjectConfiguration(**config.project_configuration_kwargs(run_dir))``: ``project_kwargs`` with
        ``project_dir``/``logging_dir`` defaulting to the run folder (the user's win)."""
        return project_configuration_kwargs(self.project_kwargs, run_dir)

    def lr_schedule(self, total_steps: int) -> LRSchedule:
        """The learning-rate schedule of a run of ``total_steps`` optimizer steps."""
        warmup = self.lr_warmup_steps or int(round(self.lr_warmup_fraction * total_steps))
        return LRSchedule(self.lr_scheduler, min(warmup, total_steps), total_steps,
                          self.lr_initial / self.train_learning_rate, self.lr_num_cycles, self.lr_power)

    def final_dir(self, run_dir: str | os.PathLike) -> str:
        """Where the final model goes: ``output_dir``, or ``<run_dir>/final``."""
        return self.output_dir or os.path.join(run_dir, "final")

    def hub_repo_id(self, run_name: str) -> str:
        """The repo ``push_to_hub`` uploads to: ``hub_model_id``, or the run name."""
        return self.hub_model_id or run_name

    def resolved(self, name: str) -> dict:
        """The mapping field ``name`` with every ``${env:NAME}`` replaced by the environment variable
        (build the reward from ``config.resolved("reward_options")``)."""
        return resolve_env(getattr(self, name))

    # ---- validation ----

    def _check(self, c: Checks, num_processes: int, check_environment: bool) -> None:
        if c.ok("run_name") and (os.sep in self.run_name or "/" in self.run_name or self.run_name in (".", "..")):
            c.add("run_name", "must be a plain folder name (it becomes logdir/<run_name>)",
                  "drop the slashes; put the parent folder in logdir")
        if c.ok("logdir") and not self.logdir:
            c.add("logdir", "must not be empty", "set logdir to a folder, e.g. logs")
        c.one_of("log_with", TRACKERS, f"use one of {', '.join(TRACKER_PACKAGES)}, all, or null for no tracker")
        for name in ("num_epochs", "save_freq", "num_checkpoint_limit", "sample_num_steps", "train_batch_size",
                     "train_gradient_accumulation_steps"):
            c.at_least(name, 1)
        if self.mixed_precision is not None:
            c.one_of("mixed_precision", MIXED_PRECISION,
                     "use 'no' (accelerate's word for none; quote it in YAML 1.1 tools), 'fp16', 'bf16', or null "
                     "to follow accelerate")
        c.between("sample_eta", 0.0, 1.0, fix="set sample_eta in [0, 1]: DDIM's sigma_t needs eta <= 1 "
                                              "(Song et al. 2021, eq. 16)")
        c.positive("train_learning_rate")
        c.between("train_adam_beta1", 0.0, 1.0, high_open=True)
        c.between("train_adam_beta2", 0.0, 1.0, high_open=True)
        c.at_least("train_adam_weight_decay", 0.0)
        c.positive("train_adam_epsilon")
        c.positive("train_max_grad_norm")
        if c.ok("model_revision") and not self.model_revision:
            c.add("model_revision", "must not be empty", "use main, a tag or a commit")
        for name in ("model", "reward", "prompts"):
            if c.ok(name) and getattr(self, name) == "":
                c.add(name, "must not be empty", f"set {name} to a name, or null for the default")
        self._check_lora(c)
        self._check_schedule(c)
        self._check_sizes(c)
        c.at_least("eval_every", 0)
        c.at_least("eval_num_samples", 1)
        if self.keep_best and c.ok("eval_every") and self.eval_every == 0:
            c.add("keep_best", "needs evaluations to rank checkpoints", "set eval_every to 1 or more")
        if c.ok("hub_model_id") and self.hub_model_id is not None and self.hub_model_id.count("/") > 1:
            c.add("hub_model_id", "is not a repo id", "write it as name or user/name")
        if c.ok("project_kwargs"):
            for key in self.project_kwargs:
                if key not in PROJECT_CONFIGURATION_KEYS:
                    close = suggest(str(key), PROJECT_CONFIGURATION_KEYS)
                    c.add(f"project_kwargs.{key}", "is not a field of accelerate's ProjectConfiguration",
                          f"did you mean {close!r}?" if close else f"use {', '.join(PROJECT_CONFIGURATION_KEYS)}",
                          value=self.project_kwargs[key])
        if check_environment:
            self._check_environment(c)

    def _check_lora(self, c: Checks) -> None:
        if self.train_lora:
            c.at_least("lora_rank", 1)
            c.positive("lora_alpha")
            if c.ok("lora_target_modules") and not self.lora_target_modules:
                c.add("lora_target_modules", "must name at least one module",
                      f"e.g. lora_target_modules=[{', '.join(DEFAULT_LORA_TARGETS)}]")
        for name in ("lora_rank", "lora_alpha", "lora_target_modules"):
            c.unchanged_unless(self.train_lora, name, "with train_lora=false")

    def _check_sizes(self, c: Checks) -> None:
        for name in SIZE_FIELDS:
            value = getattr(self, name)
            if value is not None and c.ok(name) and (value < VAE_FACTOR or value % VAE_FACTOR):
                nearest = max(VAE_FACTOR, -(-value // VAE_FACTOR) * VAE_FACTOR)  # rounded up
                c.add(name, f"must be a positive multiple of {VAE_FACTOR} pixels (the SD/SDXL VAE's factor: the "
                            "latents are 1/8 of the image)", f"set {name}={nearest}, or null for the model's "
                                                             "native size")
        for name in ("sdxl_original_size", "sdxl_target_size"):
            value = getattr(self, name)
            if value is not None and c.ok(name) and min(value) < 1:
                c.add(name, "must be two positive sizes (height, width) in pixels", f"e.g. {name}=[1024,1024], or "
                                                                                     "null for the sampled size")
        if c.ok("sdxl_crops_coords_top_left") and min(self.sdxl_crops_coords_top_left) < 0:
            c.add("sdxl_crops_coords_top_left", "must be two offsets >= 0 (top, left) in pixels",
                  "use [0,0] (no crop) unless you mean a crop")
        if c.ok("vae") and self.vae == "":
            c.add("vae", "must not be empty", "give a folder, file or Hub id, or null for the model's own VAE")

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

    def _check_environment(self, c: Checks) -> None:
        packages = TRACKER_PACKAGES.get(self.log_with or "")
        if c.ok("log_with") and packages and not any(_installed(m) for m in packages):
            c.add("log_with", f"needs the {packages[0]} package", f"pip install {packages[0]}")
        if self.train_use_8bit_adam is True and not _installed("bitsandbytes"):
            c.add("train_use_8bit_adam", "needs the bitsandbytes package",
                  "pip install 'diffrl[bnb]', or set train_use_8bit_adam=false")
        for name in OPTION_FIELDS:
            for where, variable in env_references(getattr(self, name)) if c.ok(name) else ():
                if variable not in os.environ:
                    c.add(f"{name}.{where}", f"reads the environment variable {variable}, which is not set",
                          f"export {variable}=... before the run", value=f"${{env:{variable}}}")
        if c.ok("mixed_precision"):
            self._check_precision(c)

    def _check_precision(self, c: Checks) -> None:
        precision = self.resolve_mixed_precision(gpu=False)  # fp16 only when set by the config or accelerate
        if precision.value == "fp16" and not has_accelerator_device():
            by = "" if precision.source == "config" else " (set by accelerate: $ACCELERATE_MIXED_PRECISION)"
            c.add("mixed_precision", f"fp16{by} on a machine without a GPU: fp16 autocast on a CPU ran 8-17x "
                  "slower per epoch", "set mixed_precision=no (or bf16) on a CPU, or run on a GPU", value="fp16")


def _renamed(old: str, value: object) -> Violation:
    new = RENAMED[old]
    return Violation(old, value, f"was renamed to {new} (TRL's example scripts have their own --{old})",
                     f"write {new}: {value!r} (or {new}={value!r}) instead")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
