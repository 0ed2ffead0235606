"""What both policies share: a trainable UNet (LoRA adapters or all weights), its device and precision."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from diffrl.pipelines import precision
from diffrl.pipelines.lora import LoraSettings, add_lora
from diffrl.pipelines.schedule import DenoisingSchedule


class TrainableUNetPolicy:
    """Base of :class:`~diffrl.pipelines.StableDiffusionPolicy` and :class:`~diffrl.pipelines.DDPMPolicy`.

    ``_unet`` is the model itself; ``unet`` is what forward passes call, which ``accelerate.prepare`` may replace
    by a distributed wrapper. Subclasses name the frozen modules that follow the UNet's device and precision.
    """

    pipeline: Any
    _unet: torch.nn.Module

    def _setup(self, pipeline: Any, schedule: DenoisingSchedule, *, use_lora: bool, lora: LoraSettings | None,
               mixed_precision: str, device: torch.device | str | None, base_model: str | None,
               revision: str) -> None:
        self.pipeline = pipeline
        self.mixed_precision = mixed_precision
        self.use_lora = use_lora
        self.lora = (lora or LoraSettings()) if use_lora else None
        self.base_model = base_model
        self.revision = revision
        self.schedule = schedule
        self.num_train_timesteps = schedule.num_train_timesteps
        unet = pipeline.unet.eval()
        if use_lora:
            add_lora(unet, self.lora)
        else:
            unet.requires_grad_(True)
        self._unet = unet
        self.unet: torch.nn.Module = unet
        self.to(device or "cpu", mixed_precision)

    def _frozen_modules(self) -> list[torch.nn.Module]:
        """Modules besides the UNet that move and change precision with it (the VAE, the text encoder)."""
        return []

    def to(self, device: torch.device | str | None = None, mixed_precision: str | None = None):
        """Move to ``device`` and/or switch precision (frozen weights half, trainable weights float32)."""
        self.mixed_precision = mixed_precision or self.mixed_precision
        device = torch.device(device) if device is not None else self.device
        precision.place_policy_modules(self._frozen_modules(), self._unet, self.use_lora, device, self.mixed_precision)
        return self

    @property
    def device(self) -> torch.device:
        return next(self._unet.parameters()).device

    def autocast(self) -> contextlib.AbstractContextManager:
        return precision.autocast(self.device, self.mixed_precision)

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        return (p for p in self._unet.parameters() if p.requires_grad)
