"""Unconditional pixel-space DDPM (``UNet2DModel``, e.g. ``google/ddpm-celebahq-256``) as a policy."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from diffusers import DDPMPipeline
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file, save_file

from diffrl.pipelines.base import TrainableUNetPolicy
from diffrl.pipelines.chain import run_chain
from diffrl.pipelines.loading import load_pipeline
from diffrl.pipelines.lora import LoraSettings, load_lora_state_dict, lora_state_dict
from diffrl.pipelines.saved import plan_load, write_model_info
from diffrl.pipelines.schedule import DenoisingSchedule, SamplerName
from diffrl.pipelines.types import SampleResult, TextConditioning
from diffrl.samplers import StepOutput

# PEFT's on-disk names, so ``peft.PeftModel.from_pretrained(unet, folder)`` loads what diffrl saves.
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class DDPMPolicy(TrainableUNetPolicy):
    """An unconditional diffusion model in pixel space: no text, no guidance; LoRA or full fine-tuning.

    Samples with DDIM (``eta > 0``, default) or the DDPM ancestral step (``sampler="ddpm"``).
    Images are returned in ``[0, 1]`` with 3 channels (single-channel models are repeated).
    """

    is_conditional = False

    def __init__(
        self,
        pipeline: DDPMPipeline,
        *,
        use_lora: bool = True,
        lora: LoraSettings | None = None,
        mixed_precision: str = "no",
        device: torch.device | str | None = None,
        base_model: str | None = None,
        revision: str = "main",
        sampler: SamplerName = "ddim",
    ) -> None:
        schedule = DenoisingSchedule.from_scheduler_config(pipeline.scheduler.config, sampler=sampler)
        self._setup(pipeline, schedule, use_lora=use_lora, lora=lora, mixed_precision=mixed_precision, device=device,
                    base_model=base_model, revision=revision)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str = "main",
        use_lora: bool = True,
        lora: LoraSettings | None = None,
        lora_weights: str | os.PathLike | None = None,
        mixed_precision: str = "no",
        device: torch.device | str | None = None,
        sampler: SamplerName = "ddim",
    ) -> "DDPMPolicy":
        """Load from a Hub id, a ``DDPMPipeline`` folder, or a result saved by diffrl (LoRA results load their
        base model first, then the adapter, ready to continue training)."""
        plan = plan_load(name_or_path, revision, "ddpm", use_lora, lora, lora_weights)
        pipeline = load_pipeline(DDPMPipeline, plan.base, revision=plan.revision)
        policy = cls(pipeline, use_lora=plan.use_lora, lora=plan.lora, mixed_precision=mixed_precision, device=device,
                     base_model=plan.base, revision=plan.revision, sampler=sampler)
        if plan.lora_weights is not None:
            policy.load_lora_weights(plan.lora_weights)
        return policy

    def load_lora_weights(self, source: str | os.PathLike) -> None:
        """Load a PEFT adapter folder (``adapter_model.safetensors``) into the trainable adapter."""
        file = Path(source, PEFT_WEIGHTS_FILE)
        if not file.is_file():
            raise FileNotFoundError(f"No LoRA adapter at '{source}': expected {PEFT_WEIGHTS_FILE} there.")
        state = {k.removeprefix(_PEFT_PREFIX): v for k, v in load_file(file).items()}
        load_lora_state_dict(self._unet, state, os.fspath(source))

    # ----------------------------------------------------------------- pieces
    def initial_noise(self, batch_size: int, generator=None) -> torch.Tensor:
        config = self._unet.config
        size = config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, config.in_channels, h, w)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32) * self.schedule.init_noise_sigma

    def predict(self, x: torch.Tensor, t: torch.Tensor, conditioning: TextConditioning | None = None,
                guidance_scale: float = 1.0) -> torch.Tensor:
        with self.autocast():
            return self.unet(x.to(self._unet.dtype), t).sample.float()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        images = (x.float() / 2 + 0.5).clamp(0, 1)
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    # ----------------------------------------------------------------- policy interface
    def sample(
        self,
        prompts: Sequence[str] | None = None,
        *,
        batch_size: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        eta: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        grad_steps: Sequence[bool] | None = None,
        gradient_checkpointing: bool = False,
        stop_after_step: int | None = None,
        progress: bool = False,
        **ignored_conditioning,
    ) -> SampleResult:
        """Sample ``batch_size`` images (or ``len(prompts)``: prompts are ignored, they only set the count).

        ``guidance_scale`` and text options do not apply to an unconditional model and are ignored.
        """
        if batch_size is None:
            if prompts is None:
                raise ValueError("Give batch_size (or a list of prompts, one per image) to sample a DDPM.")
            batch_size = 1 if isinstance(prompts, str) else len(prompts)
        names = [""] * batch_size if prompts is None or isinstance(prompts, str) else list(prompts)
        x_T = latents.to(self.device, torch.float32) if latents is not None else self.initial_noise(batch_size, generator)
        return run_chain(self, x_T, None, names, num_inference_steps=num_inference_steps, guidance_scale=1.0,
                         eta=eta, generator=generator, grad_steps=grad_steps,
                         gradient_checkpointing=gradient_checkpointing, stop_after_step=stop_after_step,
                         progress=progress)

    def step_log_prob(self, latents, timesteps, prev_timesteps, next_latents, conditioning=None, *, eta=1.0,
                      guidance_scale=1.0) -> StepOutput:
        out = self.predict(latents, timesteps)
        return self.schedule.step(out, latents, timesteps, prev_timesteps, eta=eta, prev_sample=next_latents)

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
        write_model_info(directory, kind="ddpm", base_model=self.base_model, revision=self.revision,
                         lora=self.lora.to_dict() if self.lora else None)
