"""The model section: what is loaded and trained (weights, LoRA, precision, image size, VAE, family options).

The options of one model family (SDXL's size conditioning, ...) are the mapping ``model_options``: the family
checks them itself before any weights load (:meth:`diffrl.pipelines.base.TrainableUNetPolicy.setting_violations`),
as a reward checks its ``reward_options``; no trainer's config carries a field of one family.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from diffrl.config._base import APPLY, Checks, ConfigBase, option
from diffrl.config.accelerate_settings import MIXED_PRECISION, Precision, has_accelerator_device, \
    resolve_mixed_precision
from diffrl.config.resume import MODEL, MODEL_OPTIONS, PRECISION, SHAPES, VAE

__all__ = ["DEFAULT_LORA_TARGETS", "ModelSection", "SIZE_FIELDS", "VAE_FACTOR"]

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
VAE_FACTOR = 8
"""Pixels per latent cell of the SD and SDXL VAEs (three 2x downsamplings); the built policy's own factor is
checked again when it is loaded (:func:`diffrl.build.check_policy_settings`)."""
SIZE_FIELDS = ("sample_height", "sample_width")


@dataclasses.dataclass
class ModelSection(ConfigBase):
    """The model and the part of it that trains."""

    mixed_precision: Optional[str] = option(
        None, resume=PRECISION,
        help="'no', 'fp16' or 'bf16'. null: what `accelerate launch --mixed_precision` / accelerate's config file "
             "say, else TRL's fp16 on a GPU and 'no' on a CPU.")

    # ---- diffrl extras ----
    model: Optional[str] = option(None, trl=False, resume=MODEL,
                                  help="Model to fine-tune: a Hub id, a local diffusers folder or a single "
                                       ".safetensors/.ckpt file. null: the embedded 8x8 digits DDPM.")
    model_revision: str = option("main", trl=False, resume=MODEL,
                                 help="Hub revision (branch, tag or commit) of `model`.")
    model_options: dict = option(
        factory=dict, trl=False, resume=MODEL_OPTIONS,
        help="Options of the model's family, checked by the family before any weights load (an option of "
             "another family is an error). SDXL: original_size, target_size ([height, width]; null: the sampled "
             "size) and crops_coords_top_left ([top, left], default [0, 0]) of the add_time_ids size "
             "conditioning (Podell et al. 2023, sec. 2.2); model_options.target_size=[512,512] on the command "
             "line.")
    train_lora: bool = option(True, trl=False, resume=MODEL,
                              help="Train LoRA adapters (true) or the full network (false). Formerly use_lora.")
    lora_rank: int = option(4, trl=False, resume=MODEL, help="LoRA rank.")
    lora_alpha: int = option(4, trl=False, resume=MODEL,
                             help="LoRA alpha (the update is scaled by lora_alpha / lora_rank).")
    lora_target_modules: list[str] = option(factory=lambda: list(DEFAULT_LORA_TARGETS), trl=False, resume=MODEL,
                                            help="Modules of the trained network that get LoRA adapters.")
    sample_height: Optional[int] = option(
        None, trl=False, resume=SHAPES,
        help="Height in pixels of the sampled (and trained) images, a multiple of 8 (the SD/SDXL VAE factor), e.g. "
             "512 for SDXL on a small GPU. null: the model's native size. Not for unconditional DDPMs, whose size "
             "is fixed.")
    sample_width: Optional[int] = option(None, trl=False, resume=SHAPES,
                                         help="Width in pixels of the sampled images; as sample_height.")
    vae: Optional[str] = option(
        None, trl=False, resume=VAE,
        help="A separate VAE replacing the model's (SD and SDXL): a folder, single file or Hub id, e.g. "
             "madebyollin/sdxl-vae-fp16-fix, which decodes SDXL latents in fp16 without overflowing. null: the "
             "model's own VAE.")
    gradient_checkpointing: bool = option(
        False, trl=False, resume=APPLY,
        help="Recompute the trained network's block activations in the backward pass of the training loss instead "
             "of storing them (diffusers' gradient checkpointing): less memory, roughly a third more compute per "
             "update.")

    def resolve_mixed_precision(self, environ: dict | None = None, gpu: bool | None = None) -> Precision:
        """The precision in force (see :func:`~diffrl.config.accelerate_settings.resolve_mixed_precision`);
        record it with ``dataclasses.replace(config, mixed_precision=precision.value)``."""
        return resolve_mixed_precision(self.mixed_precision, environ=environ, gpu=gpu)

    def _check(self, c: Checks, num_processes: int, check_environment: bool) -> None:
        super()._check(c, num_processes, check_environment)
        if self.mixed_precision is not None:
            c.one_of("mixed_precision", MIXED_PRECISION,
                     "use 'no' (accelerate's word for none; quote it in YAML 1.1 tools), 'fp16', 'bf16', or null "
                     "to follow accelerate")
        if c.ok("model_revision") and not self.model_revision:
            c.add("model_revision", "must not be empty", "use main, a tag or a commit")
        if c.ok("model") and self.model == "":
            c.add("model", "must not be empty", "set model to a name, or null for the default")
        if c.ok("model_options"):
            for key in self.model_options:
                if not isinstance(key, str) or not key.isidentifier():
                    c.add(f"model_options.{key}", "is not an option name", "write model_options.NAME=VALUE",
                          value=self.model_options[key])
        self._check_lora(c)
        self._check_sizes(c)
        if check_environment and c.ok("mixed_precision"):
            self._check_precision(c)

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
        if c.ok("vae") and self.vae == "":
            c.add("vae", "must not be empty", "give a folder, file or Hub id, or null for the model's own VAE")

    def _check_precision(self, c: Checks) -> None:
        precision = self.resolve_mixed_precision(gpu=False)  # fp16 only when set by the config or accelerate
        if precision.value == "fp16" and not has_accelerator_device():
            by = "" if precision.source == "config" else " (set by accelerate: $ACCELERATE_MIXED_PRECISION)"
            c.add("mixed_precision", f"fp16{by} on a machine without a GPU: fp16 autocast on a CPU ran 8-17x "
                  "slower per epoch", "set mixed_precision=no (or bf16) on a CPU, or run on a GPU", value="fp16")
