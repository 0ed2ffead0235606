"""TRL 0.23's ``DDPOStableDiffusionPipeline`` surface over diffrl policies, so TRL users' code keeps working.

Differences from TRL, all fixes: ``generator`` drives the per-step noise too (a seed reproduces a
trajectory), ``eta = 0`` gives a clear error when log-probabilities are read instead of dividing by zero,
and ``save_pretrained`` writes LoRA weights that load back (TRL issues 1404, 2505).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffrl.algorithms.truncation import trl_plan
from diffrl.pipelines.ddpm import DDPMPolicy
from diffrl.pipelines.lora import LoraSettings
from diffrl.pipelines.stable_diffusion import StableDiffusionPolicy
from diffrl.pipelines.stable_diffusion_xl import StableDiffusionXLPolicy
from diffrl.pipelines.types import DiffusionPolicy, SampleResult, TextConditioning
from diffrl.samplers import DeterministicStepError


def _first_generator(generator) -> torch.Generator | None:
    if isinstance(generator, (list, tuple)):
        return generator[0] if generator else None
    return generator


@dataclass
class DDPOPipelineOutput:
    """``images`` (``[B, 3, H, W]`` in ``[0, 1]`` for ``output_type="pt"``), ``latents`` (the ``N + 1`` tensors
    ``[B, C, h, w]`` of the chain) and ``log_probs`` (``N`` tensors ``[B]``)."""

    images: Any
    latents: list[torch.Tensor]
    _log_probs: list[torch.Tensor] = field(repr=False)
    eta: float = 1.0

    @property
    def log_probs(self) -> list[torch.Tensor]:
        if self.eta == 0:
            raise DeterministicStepError(
                "log_probs are undefined for a trajectory sampled with eta=0 (deterministic DDIM); "
                "sample with eta > 0 (DDPO uses eta=1.0) to get log-probabilities."
            )
        return self._log_probs


@dataclass
class DDPOSchedulerOutput:
    """``latents``: ``[B, C, h, w]`` the next sample; ``log_probs``: ``[B]``."""

    latents: torch.Tensor
    log_probs: torch.Tensor


def _format_images(images: torch.Tensor, output_type: str):
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).float().cpu().numpy()
    if output_type == "np":
        return array
    if output_type == "pil":
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
    raise ValueError(f"output_type={output_type!r} is not supported; use 'pil', 'np', 'pt' or 'latent'.")


# diffusers ``__call__`` arguments that do not change what is sampled here.
_IGNORED_ARGS = {"return_dict", "callback", "callback_steps", "cross_attention_kwargs", "guidance_rescale"}


class DDPOStableDiffusionPipeline:
    """The interface of TRL's ``DDPOStableDiffusionPipeline``, for code typed against it.

    diffrl's trainers train the diffrl policy behind a pipeline (its ``policy`` attribute), not these
    methods, so subclassing this class does not plug in another model: write a policy instead (a
    :class:`~diffrl.pipelines.base.TrainableUNetPolicy` subclass) and pass it, or a pipeline over it, to the trainer.
    """

    policy: DiffusionPolicy

    def __call__(self, *args, **kwargs) -> DDPOPipelineOutput:
        raise NotImplementedError

    def scheduler_step(self, *args, **kwargs) -> DDPOSchedulerOutput:
        raise NotImplementedError

    def rgb_with_grad(self, *args, **kwargs) -> DDPOPipelineOutput:
        raise NotImplementedError

    @property
    def unet(self):
        raise NotImplementedError

    @property
    def vae(self):
        raise NotImplementedError

    @property
    def tokenizer(self):
        raise NotImplementedError

    @property
    def scheduler(self):
        raise NotImplementedError

    @property
    def text_encoder(self):
        raise NotImplementedError

    @property
    def autocast(self):
        raise NotImplementedError

    def set_progress_bar_config(self, *args, **kwargs):
        raise NotImplementedError

    def save_pretrained(self, *args, **kwargs):
        raise NotImplementedError

    def get_trainable_layers(self, *args, **kwargs):
        raise NotImplementedError

    def save_checkpoint(self, *args, **kwargs):
        raise NotImplementedError

    def load_checkpoint(self, *args, **kwargs):
        raise NotImplementedError


class _PolicyPipeline(DDPOStableDiffusionPipeline):
    """The TRL surface implemented once over any diffrl policy."""

    def __init__(self, policy: DiffusionPolicy) -> None:
        self.policy = policy
        self.use_lora = policy.use_lora
        self._progress = False
        self._num_inference_steps: int | None = None

    # ------------------------------------------------------------- sampling
    def _sample(self, prompt=None, *, num_inference_steps=50, guidance_scale=7.5, negative_prompt=None,
                num_images_per_prompt=1, eta=0.0, generator=None, latents=None, prompt_embeds=None,
                negative_prompt_embeds=None, height=None, width=None, grad_steps=None,
                gradient_checkpointing=False, **unsupported) -> SampleResult:
        unknown = set(unsupported) - _IGNORED_ARGS
        if unknown:
            raise TypeError(f"unsupported argument(s) {sorted(unknown)} for the diffrl DDPO pipeline.")
        if unsupported.get("guidance_rescale"):
            raise NotImplementedError("guidance_rescale is not supported by diffrl's policies; leave it at 0.")
        self._num_inference_steps = num_inference_steps
        kwargs: dict[str, Any] = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                                      generator=generator, latents=latents, grad_steps=grad_steps,
                                      gradient_checkpointing=gradient_checkpointing, progress=self._progress)
        if not self.policy.is_conditional:
            count = prompt_embeds.shape[0] if prompt_embeds is not None else (
                1 if prompt is None or isinstance(prompt, str) else len(prompt))
            return self.policy.sample(batch_size=count * num_images_per_prompt, **kwargs)
        if prompt_embeds is not None:
            neg = negative_prompt_embeds if guidance_scale > 1.0 else None
            if neg is None and guidance_scale > 1.0:
                neg = self.policy.encode_prompts([""] * prompt_embeds.shape[0]).negative_prompt_embeds
            cond = TextConditioning(prompt_embeds, neg)
            return self.policy.sample(conditioning=cond, height=height, width=width, **kwargs)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if isinstance(negative_prompt, list) and num_images_per_prompt > 1:
            negative_prompt = [n for n in negative_prompt for _ in range(num_images_per_prompt)]
        return self.policy.sample(prompts, negative_prompts=negative_prompt, height=height, width=width, **kwargs)

    def _output(self, result: SampleResult, output_type: str, eta: float, with_grad: bool) -> DDPOPipelineOutput:
        traj = result.trajectory
        latents = list(traj.latents.unbind(dim=1))
        if output_type == "latent":
            images = latents[-1]
        else:
            images = _format_images(result.images_with_grad if with_grad else traj.images, output_type)
        return DDPOPipelineOutput(images, latents, list(traj.log_probs.unbind(dim=1)), eta=eta)

    @torch.no_grad()
    def __call__(self, prompt=None, *, output_type: str = "pil", eta: float = 0.0, **kwargs) -> DDPOPipelineOutput:
        """Sample like diffusers' pipeline ``__call__``, returning images, the latent chain and log-probabilities."""
        return self._output(self._sample(prompt, eta=eta, **kwargs), output_type, eta, with_grad=False)

    def rgb_with_grad(self, prompt=None, *, output_type: str = "pt", eta: float = 0.0, truncated_backprop: bool = True,
                      truncated_backprop_rand: bool = True, gradient_checkpoint: bool = True,
                      truncated_backprop_timestep: int = 49, truncated_rand_backprop_minmax: tuple = (0, 50),
                      num_inference_steps: int = 50, **kwargs) -> DDPOPipelineOutput:
        """Sample with gradients to the UNet weights at steps ``i >= k``, differentiable images.

        ``k`` is TRL's: fixed, or drawn uniformly from ``truncated_rand_backprop_minmax`` with both ends
        included (``random.randint``); the same plan as diffrl's AlignProp trainer
        (:func:`diffrl.algorithms.truncation.trl_plan`). ``k`` is drawn from ``generator`` (the first of a
        list), so a seed reproduces the whole call; without one, from torch's global generator."""
        plan = trl_plan(num_inference_steps, truncated_backprop=truncated_backprop,
                        truncated_backprop_rand=truncated_backprop_rand,
                        truncated_backprop_timestep=truncated_backprop_timestep,
                        truncated_rand_backprop_minmax=tuple(truncated_rand_backprop_minmax),
                        generator=_first_generator(kwargs.get("generator")))
        result = self._sample(prompt, eta=eta, num_inference_steps=num_inference_steps, grad_steps=plan.grad_steps,
                              gradient_checkpointing=gradient_checkpoint, **kwargs)
        return self._output(result, output_type, eta, with_grad=True)

    def scheduler_step(self, model_output, timestep, sample, eta: float = 0.0, use_clipped_model_output: bool = False,
                       generator=None, prev_sample=None) -> DDPOSchedulerOutput:
        """One DDIM step with log-probability; ``timestep`` is an int or ``[B]``; uses the last ``set_timesteps``."""
        schedule = self.policy.schedule
        steps = schedule.scheduler.num_inference_steps or self._num_inference_steps
        if steps is None:
            raise ValueError("call scheduler.set_timesteps(num_inference_steps) (or sample once) before scheduler_step.")
        t = torch.as_tensor(timestep, device=sample.device).long().expand(sample.shape[0])
        if use_clipped_model_output:
            raise NotImplementedError("use_clipped_model_output=True is not supported by scheduler_step; "
                                      "set it in the policy's PredictionConfig instead.")
        step = schedule.step(model_output, sample, t, schedule.prev_timesteps(t, steps), eta=eta, generator=generator,
                             prev_sample=prev_sample)
        return DDPOSchedulerOutput(step.prev_sample, step.log_prob)

    # ------------------------------------------------------------- components
    @property
    def unet(self):
        return self.policy.unet

    @property
    def vae(self):
        return getattr(self.policy.pipeline, "vae", None)

    @property
    def tokenizer(self):
        return getattr(self.policy.pipeline, "tokenizer", None)

    @property
    def text_encoder(self):
        return getattr(self.policy.pipeline, "text_encoder", None)

    @property
    def scheduler(self):
        return self.policy.schedule.scheduler

    @property
    def autocast(self):
        return contextlib.nullcontext if self.use_lora else None

    def set_progress_bar_config(self, *args, disable: bool = False, **kwargs) -> None:
        self._progress = not disable

    def get_trainable_layers(self):
        return self.policy.unet

    def save_pretrained(self, output_dir: str | os.PathLike) -> None:
        self.policy.save_pretrained(output_dir)

    def save_checkpoint(self, models, weights, output_dir) -> None:
        """Accelerate save hook (TRL's contract): write the policy and claim its weights from ``weights``."""
        self.policy.save_pretrained(output_dir)
        if weights:
            weights.pop()

    def load_checkpoint(self, models, input_dir) -> None:
        """Accelerate load hook: restore adapter or UNet weights written by :meth:`save_checkpoint`."""
        if self.use_lora:
            self.policy.load_lora_weights(input_dir)
        else:
            unet = self.policy.trainable_module
            loaded = type(unet).from_pretrained(input_dir, subfolder="unet")
            unet.load_state_dict(loaded.state_dict())
        if models:
            models.pop()


class DefaultDDPOStableDiffusionPipeline(_PolicyPipeline):
    """TRL's default pipeline: ``DefaultDDPOStableDiffusionPipeline(name, pretrained_model_revision=..., use_lora=...)``.

    Extra keyword arguments (``lora``, ``mixed_precision``, ``device``, ``single_file_config``, ``lora_weights``)
    go to :meth:`StableDiffusionPolicy.from_pretrained`.
    """

    def __init__(self, pretrained_model_name: str, *, pretrained_model_revision: str = "main", use_lora: bool = True,
                 lora: LoraSettings | None = None, **kwargs) -> None:
        super().__init__(StableDiffusionPolicy.from_pretrained(
            pretrained_model_name, revision=pretrained_model_revision, use_lora=use_lora, lora=lora, **kwargs))


class DefaultDDPODDPMPipeline(_PolicyPipeline):
    """The same surface for unconditional pixel-space DDPMs (``google/ddpm-celebahq-256``, ...)."""

    def __init__(self, pretrained_model_name: str, *, pretrained_model_revision: str = "main", use_lora: bool = True,
                 lora: LoraSettings | None = None, **kwargs) -> None:
        super().__init__(DDPMPolicy.from_pretrained(
            pretrained_model_name, revision=pretrained_model_revision, use_lora=use_lora, lora=lora, **kwargs))


class DefaultDDPOStableDiffusionXLPipeline(_PolicyPipeline):
    """The same surface for Stable Diffusion XL, which TRL never had (TRL issue 1630):
    ``DefaultDDPOStableDiffusionXLPipeline(name, pretrained_model_revision=..., use_lora=...)``.

    Extra keyword arguments (``lora``, ``mixed_precision``, ``device``, ``vae``, ``original_size``, ...) go to
    :meth:`StableDiffusionXLPolicy.from_pretrained`. Sampling takes prompts (SDXL also needs pooled embeddings and
    ``add_time_ids``, which ``prompt_embeds`` alone do not carry).
    """

    def __init__(self, pretrained_model_name: str, *, pretrained_model_revision: str = "main", use_lora: bool = True,
                 lora: LoraSettings | None = None, **kwargs) -> None:
        super().__init__(StableDiffusionXLPolicy.from_pretrained(
            pretrained_model_name, revision=pretrained_model_revision, use_lora=use_lora, lora=lora, **kwargs))

    def _sample(self, prompt=None, **kwargs) -> SampleResult:
        if kwargs.get("prompt_embeds") is not None:
            raise ValueError("DefaultDDPOStableDiffusionXLPipeline samples from prompts (prompt=...); SDXL also needs "
                             "pooled embeddings and add_time_ids, so for precomputed states call "
                             "policy.sample(conditioning=policy.encode_prompts(prompts)).")
        return super()._sample(prompt, **kwargs)

    @property
    def tokenizer_2(self):
        return self.policy.pipeline.tokenizer_2

    @property
    def text_encoder_2(self):
        return self.policy.pipeline.text_encoder_2
