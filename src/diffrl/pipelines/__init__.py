"""Policies: diffusion models that sample trajectories with log-probabilities and recompute them with gradients."""

from diffrl.pipelines.base import TrainableUNetPolicy
from diffrl.pipelines.ddpm import DDPMPolicy
from diffrl.pipelines.loading import ModelLoadError, load_pipeline
from diffrl.pipelines.lora import LoraSettings
from diffrl.pipelines.stable_diffusion import StableDiffusionPolicy
from diffrl.pipelines.stable_diffusion_xl import SDXLConditioning, StableDiffusionXLPolicy
from diffrl.pipelines.types import DiffusionPolicy, SampleResult, TextConditioning, Trajectory
from diffrl.samplers import DenoisingSchedule  # the schedule every policy holds (its home is samplers/)

__all__ = [
    "DDPMPolicy",
    "DenoisingSchedule",
    "DiffusionPolicy",
    "LoraSettings",
    "ModelLoadError",
    "SDXLConditioning",
    "SampleResult",
    "StableDiffusionPolicy",
    "StableDiffusionXLPolicy",
    "TextConditioning",
    "TrainableUNetPolicy",
    "Trajectory",
    "load_pipeline",
]
