"""Unconditional pixel-space DDPM (``UNet2DModel``, e.g. ``google/ddpm-celebahq-256``) as a policy."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from diffusers import DDPMPipeline
from safetensors.torch import load_file, save_file

from diffrl.pipelines import precision
from diffrl.pipelines.base import TrainableUNetPolicy
from diffrl.pipelines.chain import chain_options
from diffrl.pipelines.lora import load_lora_state_dict, lora_state_dict
from diffrl.samplers import DenoisingSchedule, SamplerName
from diffrl.pipelines.types import SampleResult, TextConditioning

# PEFT's on-disk names, so ``peft.PeftModel.from_pretrained(unet, folder)`` loads what diffrl saves.
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class DDPMPolicy(TrainableUNetPolicy):
    """An unconditional diffusion model in pixel space: no text, no guidance; LoRA or full fine-tuning.

    Samples with DDIM (``eta > 0``, default) or the DDPM ancestral step (``sampler="ddpm"``).
    Images are returned in ``[0, 1]`` with 3 channels (single-channel models are repeated).
    ``from_pretrained(name_or_path, ..., sampler="ddim")`` loads one (see
    :meth:`~diffrl.pipelines.base.TrainableUNetPolicy.from_pretrained`).
    """

    kind = "ddpm"
    description = "an unconditional pixel-space DDPM"
    pipeline_class = DDPMPipeline
    pipeline_class_names = frozenset({"DDPMPipeline", "DDIMPipeline"})
    is_conditional = False
    fixed_size = True

    def __init__(self, pipeline: DDPMPipeline, *, sampler: SamplerName = "ddim", **settings: Any) -> None:
        """``sampler``: "ddim" or "ddpm" (the ancestral step); ``settings``: as for
        :class:`~diffrl.pipelines.base.TrainableUNetPolicy` (``use_lora``, ``lora``, ``mixed_precision``, ...)."""
        self._sampler = sampler
        super().__init__(pipeline, **settings)

    def _make_schedule(self, pipeline: DDPMPipeline) -> DenoisingSchedule:
        return DenoisingSchedule.from_scheduler_config(pipeline.scheduler.config, sampler=self._sampler)

    def load_lora_weights(self, source: str | os.PathLike) -> None:
        """Load a PEFT adapter folder (``adapter_model.safetensors``) into the trainable adapter."""
        file = Path(source, PEFT_WEIGHTS_FILE)
        if not file.is_file():
            raise FileNotFoundError(f"No LoRA adapter at '{source}': expected {PEFT_WEIGHTS_FILE} there.")
        state = {k.removeprefix(_PEFT_PREFIX): v for k, v in load_file(file).items()}
        load_lora_state_dict(self._unet, state, os.fspath(source))

    # ----------------------------------------------------------------- pieces
    def _latent_shape(self, batch_size: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
        config = self._unet.config
        size = config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, config.in_channels, h, w)

    def predict(self, x: torch.Tensor, t: torch.Tensor, conditioning: TextConditioning | None = None,
                guidance_scale: float = 1.0, *, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """UNet output at ``x_t`` (float32); ``params`` replace trainable weights for this call."""
        with self.autocast():
            return self._network(params)(x.to(precision.module_dtype(self._unet)), t).sample.float()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        images = (x.float() / 2 + 0.5).clamp(0, 1)
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    # ----------------------------------------------------------------- policy interface
    def sample(self, prompts: Sequence[str] | None = None, *, batch_size: int | None = None,
               generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
               **options: Any) -> SampleResult:
        """Sample ``batch_size`` images (or ``len(prompts)``: prompts are ignored, they only set the count).

        ``options``: the sampling options of :func:`diffrl.pipelines.chain.run_chain` (``num_inference_steps``,
        ``eta``, ``grad_steps``, ...); ``guidance_scale`` and text options do not apply to an unconditional
        model and are ignored.
        """
        if batch_size is None:
            if prompts is None:
                raise ValueError("Give batch_size (or a list of prompts, one per image) to sample a DDPM.")
            batch_size = 1 if isinstance(prompts, str) else len(prompts)
        names = [""] * batch_size if prompts is None or isinstance(prompts, str) else list(prompts)
        return self._run(None, names, batch_size, latents, generator, guidance_scale=1.0,
                         **chain_options(options, ignore_unknown=True))

    # ----------------------------------------------------------------- saving
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """LoRA: a PEFT adapter folder (``PeftModel.from_pretrained(UNet2DModel..., folder)``);
        full fine-tuning: a ``DDPMPipeline`` folder (``DDPMPipeline.from_pretrained(folder)``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.use_lora:
            config = self.lora.peft_config()
            config.base_model_name_or_path = self.base_model
            config_dict = config.to_dict()
            config_dict["target_modules"] = sorted(config_dict["target_modules"])
            (directory / PEFT_CONFIG_FILE).write_text(json.dumps(config_dict, indent=2, default=str), encoding="utf-8")
            state = {_PEFT_PREFIX + k: v for k, v in lora_state_dict(self._unet).items()}
            save_file(state, directory / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
        else:
            DDPMPipeline(unet=self._unet, scheduler=self.pipeline.scheduler).save_pretrained(directory, safe_serialization=True)
        self._write_model_info(directory)

