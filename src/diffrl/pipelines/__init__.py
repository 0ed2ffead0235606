"""Policies: diffusion models that sample trajectories with log-probabilities and recompute them with gradients."""

from diffrl.pipelines.base import TrainableUNetPolicy
from diffrl.pipelines.ddpm import DDPMPolicy
from diffrl.pipelines.loading import ModelLoadError, load_pipeline
from diffrl.pipelines.flux import FluxPolicy
from diffrl.pipelines.lora import LoraSettings
from diffrl.pipelines.stable_diffusion import StableDiffusionPolicy
from diffrl.pipelines.stable_diffusion_3 import StableDiffusion3Policy
from diffrl.pipelines.stable_diffusion_xl import SDXLConditioning, StableDiffusionXLPolicy
from diffrl.pipelines.types import (DiffusionPolicy, PooledTextConditioning, SampleResult, TextConditioning,
                                    Trajectory)
from diffrl.samplers import DenoisingSchedule, FlowMatchSchedule  # the schedules policies hold (home: samplers/)

__all__ = [
    "DDPMPolicy",
    "DenoisingSchedule",
    "DiffusionPolicy",
    "FlowMatchSchedule",
    "FluxPolicy",
    "LoraSettings",
    "ModelLoadError",
    "PooledTextConditioning",
    "SDXLConditioning",
    "SampleResult",
    "StableDiffusion3Policy",
    "StableDiffusionPolicy",
    "StableDiffusionXLPolicy",
    "TextConditioning",
    "TrainableUNetPolicy",
    "Trajectory",
    "load_pipeline",
]
