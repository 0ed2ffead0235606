"""The sections a trainer's config is composed of: each holds the fields of one concern, their checks and their
resume rules; a trainer's config class lists the sections it reads and adds only its own fields."""

from diffrl.config.sections.groups import AdvantageStd, BatchSection, GroupSection, PPOSection, TimestepEpochSection
from diffrl.config.sections.model import DEFAULT_LORA_TARGETS, SIZE_FIELDS, VAE_FACTOR, ModelSection
from diffrl.config.sections.optim import OptimSection
from diffrl.config.sections.run import RunSection, default_exp_name
from diffrl.config.sections.task import TaskSection, split_prompts

__all__ = ["DEFAULT_LORA_TARGETS", "SIZE_FIELDS", "VAE_FACTOR", "AdvantageStd", "BatchSection", "GroupSection",
           "ModelSection", "OptimSection", "PPOSection", "RunSection", "TaskSection", "TimestepEpochSection",
           "default_exp_name", "split_prompts"]
