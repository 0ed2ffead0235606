"""Fields and rules that DDPOConfig and AlignPropConfig have in common.

The TRL fields keep TRL 0.23's names, types and defaults exactly (where the two TRL
classes differ, e.g. ``train_learning_rate``, the subclass redeclares the field).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys
from typing import Literal, Optional

from diffrl.config._base import ConfigBase, option
from diffrl.config._checks import Checks

__all__ = ["SharedConfig", "default_exp_name"]

MIXED_PRECISION = ("no", "fp16", "bf16")
LOG_WITH = (None, "wandb", "tensorboard")
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


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


@dataclasses.dataclass
class SharedConfig(ConfigBase):
    """Fields common to both trainers; not used on its own."""

    # ---- TRL 0.23 fields (both DDPOConfig and AlignPropConfig) ----
    exp_name: str = option(factory=default_exp_name,
                           help="Name of this experiment (by default the script's file name without .py).")
    run_name: str = option("", help="Name of this run: the folder logdir/<run_name>. Empty: the trainer picks "
                                    "a timestamped name.")
    seed: int = option(0, help="Random seed.")
    log_with: Optional[str] = option(None, help="Log with 'wandb' or 'tensorboard' (through accelerate); "
                                                "null: console and files only.")
    tracker_kwargs: dict = option(factory=dict, help="Keyword arguments for the tracker (e.g. wandb_project).")
    accelerator_kwargs: dict = option(factory=dict, help="Keyword arguments for the accelerator.")
    project_kwargs: dict = option(factory=dict, help="Keyword arguments for the accelerator project config "
                                                     "(e.g. logging_dir).")
    tracker_project_name: str = option("trl", help="Name of project to use for tracking.")
    logdir: str = option("logs", help="Top-level logging directory for checkpoint saving.")
    num_epochs: int = option(100, help="Number of epochs to train.")
    save_freq: int = option(1, help="Number of epochs between saving model checkpoints.")
    num_checkpoint_limit: int = option(5, help="Number of checkpoints to keep before deleting the oldest.")
    mixed_precision: str = option("fp16", help="Mixed precision training: 'no', 'fp16' or 'bf16'.")
    allow_tf32: bool = option(True, help="Allow tf32 on Ampere GPUs.")
    resume_from: str = option("", help="Resume training from a checkpoint folder, or from the newest checkpoint "
                                       "of a run folder.")
    sample_num_steps: int = option(50, help="Number of sampler inference steps.")
    sample_eta: float = option(1.0, help="Eta parameter for the DDIM sampler (0: deterministic, 1: DDPM-like).")
    sample_guidance_scale: float = option(5.0, help="Classifier-free guidance weight.")
    train_batch_size: int = option(1, help="Batch size (per GPU) to use for training.")
    train_use_8bit_adam: bool = option(False, help="Use 8bit Adam optimizer from bitsandbytes.")
    train_learning_rate: float = option(3e-4, help="Learning rate (the peak rate when lr_scheduler='warmup_cosine').")
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
    use_lora: bool = option(True, trl=False, help="Train LoRA adapters instead of the full UNet.")
    lora_rank: int = option(4, trl=False, help="LoRA rank.")
    lora_alpha: int = option(4, trl=False, help="LoRA alpha (the update is scaled by lora_alpha / lora_rank).")
    lora_target_modules: list[str] = option(factory=lambda: list(DEFAULT_LORA_TARGETS), trl=False,
                                            help="UNet modules that get LoRA adapters.")
    reward: Optional[str] = option(None, trl=False, help="Registered name of the reward function. null: the "
                                                         "model's default (the digit classifier for the digits DDPM).")
    reward_options: dict = option(factory=dict, trl=False, help="Keyword arguments for the reward "
                                                               "(reward_options.KEY=VALUE on the command line).")
    prompts: Optional[str] = option(None, trl=False, help="Registered name of the prompt source. null: the model's "
                                                          "default (an empty prompt for an unconditional model).")
    prompt_options: dict = option(factory=dict, trl=False, help="Keyword arguments for the prompt source.")
    lr_scheduler: Literal["constant", "warmup_cosine"] = option(
        "constant", trl=False,
        help="'constant', or 'warmup_cosine': linear warmup from lr_initial to train_learning_rate over "
             "lr_warmup_fraction of the optimizer steps, then cosine decay (as in ddpo-celebahq).")
    lr_initial: float = option(0.0, trl=False, help="Learning rate at step 0 of the warmup (warmup_cosine only).")
    lr_warmup_fraction: float = option(0.0, trl=False, help="Fraction of all optimizer steps spent warming up "
                                                            "(warmup_cosine only).")
    eval_every: int = option(0, trl=False, help="Evaluate on fixed seeds every N epochs (0: never).")
    eval_num_samples: int = option(64, trl=False, help="Number of samples per evaluation.")
    eval_seed: int = option(650, trl=False, help="Seed of the evaluation noise (the same samples every time).")
    keep_best: bool = option(False, trl=False, help="Also keep the checkpoint with the best evaluation reward "
                                                    "(needs eval_every > 0).")

    may_be_infinite = frozenset({"train_max_grad_norm"})

    @property
    def negative_prompt_list(self) -> list[str]:
        """``negative_prompts`` split at commas (TRL documented the commas but never split them)."""
        return split_prompts(self.negative_prompts)

    def _check(self, c: Checks, num_processes: int, check_environment: bool) -> None:
        if c.ok("run_name") and (os.sep in self.run_name or "/" in self.run_name or self.run_name in (".", "..")):
            c.add("run_name", "must be a plain folder name (it becomes logdir/<run_name>)",
                  "drop the slashes; put the parent folder in logdir")
        if c.ok("logdir") and not self.logdir:
            c.add("logdir", "must not be empty", "set logdir to a folder, e.g. logs")
        c.one_of("log_with", LOG_WITH, "use wandb, tensorboard, or null for no tracker")
        for name in ("num_epochs", "save_freq", "num_checkpoint_limit", "sample_num_steps", "train_batch_size",
                     "train_gradient_accumulation_steps"):
            c.at_least(name, 1)
        c.one_of("mixed_precision", MIXED_PRECISION,
                 "use 'no' (accelerate's word for none; quote it in YAML 1.1 tools), 'fp16' or 'bf16'")
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
        if self.use_lora:
            c.at_least("lora_rank", 1)
            c.positive("lora_alpha")
            if c.ok("lora_target_modules") and not self.lora_target_modules:
                c.add("lora_target_modules", "must name at least one module",
                      f"e.g. lora_target_modules=[{', '.join(DEFAULT_LORA_TARGETS)}]")
        for name in ("lora_rank", "lora_alpha", "lora_target_modules"):
            c.unchanged_unless(self.use_lora, name, "with use_lora=false")
        warmup = self.lr_scheduler == "warmup_cosine"
        if warmup:
            c.between("lr_warmup_fraction", 0.0, 1.0)
            c.at_least("lr_initial", 0.0)
            if c.ok("lr_initial", "train_learning_rate") and self.lr_initial > self.train_learning_rate:
                c.add("lr_initial", f"is above the peak rate train_learning_rate={self.train_learning_rate}",
                      "set lr_initial <= train_learning_rate (warmup goes up)")
        for name in ("lr_initial", "lr_warmup_fraction"):
            c.unchanged_unless(warmup, name, f"with lr_scheduler={self.lr_scheduler!r}")
        c.at_least("eval_every", 0)
        c.at_least("eval_num_samples", 1)
        if self.keep_best and c.ok("eval_every") and self.eval_every == 0:
            c.add("keep_best", "needs evaluations to rank checkpoints", "set eval_every to 1 or more")
        if check_environment:
            self._check_packages(c)

    def _check_packages(self, c: Checks) -> None:
        if self.log_with == "tensorboard" and not any(_installed(m) for m in ("tensorboard", "tensorboardX")):
            c.add("log_with", "needs the tensorboard package", "pip install 'diffrl[tensorboard]'")
        if self.log_with == "wandb" and not _installed("wandb"):
            c.add("log_with", "needs the wandb package", "pip install 'diffrl[wandb]'")
        if self.train_use_8bit_adam is True and not _installed("bitsandbytes"):
            c.add("train_use_8bit_adam", "needs the bitsandbytes package",
                  "pip install 'diffrl[bnb]', or set train_use_8bit_adam=false")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
