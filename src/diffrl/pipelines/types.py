"""Typed containers and the one interface every policy implements."""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Protocol, Sequence, runtime_checkable

import torch

from diffrl.samplers import StepOutput


class TextConditioning(NamedTuple):
    """What a text-conditioned UNet needs for one batch (``L`` tokens, ``D`` embedding width).

    Attributes:
        prompt_embeds: ``[B, L, D]`` text-encoder states of the prompts.
        negative_prompt_embeds: ``[B, L, D]`` states of the negative (or empty) prompts used by
            classifier-free guidance; ``None`` when sampled without guidance.
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None

    def index(self, idx: torch.Tensor | slice) -> "TextConditioning":
        neg = None if self.negative_prompt_embeds is None else self.negative_prompt_embeds[idx]
        return TextConditioning(self.prompt_embeds[idx], neg)


class Trajectory(NamedTuple):
    """One sampled batch with everything needed to recompute its log-probabilities.

    Shapes: ``B`` batch, ``N`` denoising steps, ``C, h, w`` latent (or pixel) shape, ``H, W`` image size.

    Attributes:
        images: ``[B, 3, H, W]`` float32 in ``[0, 1]`` (single-channel models are repeated to 3 channels).
        latents: ``[B, N + 1, C, h, w]`` the chain ``x_T, ..., x_0``.
        timesteps: ``[B, N]`` the timestep ``t`` of each transition.
        prev_timesteps: ``[B, N]`` the timestep ``t'`` each transition lands on.
        log_probs: ``[B, N]`` ``log p(x_t' | x_t)`` of each transition (mean-reduced, see
            :func:`diffrl.samplers.gaussian_log_prob`); zeros when sampled with ``eta = 0``.
        conditioning: the text conditioning (``None`` for unconditional models).
        prompts: the ``B`` prompts (empty strings for unconditional models).
    """

    images: torch.Tensor
    latents: torch.Tensor
    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    log_probs: torch.Tensor
    conditioning: TextConditioning | None
    prompts: list[str]


class SampleResult(NamedTuple):
    """Output of :meth:`DiffusionPolicy.sample`: the trajectory and, when sampling with gradients, the
    differentiable images (``[B, 3, H, W]``, attached to the graph) that :attr:`Trajectory.images` detaches."""

    trajectory: Trajectory
    images_with_grad: torch.Tensor | None


@runtime_checkable
class DiffusionPolicy(Protocol):
    """A diffusion model seen as a policy over denoising trajectories.

    Implemented by :class:`~diffrl.pipelines.StableDiffusionPolicy` and :class:`~diffrl.pipelines.DDPMPolicy`.
    """

    is_conditional: bool
    unet: torch.nn.Module
    num_train_timesteps: int

    @property
    def device(self) -> torch.device: ...

    def sample(
        self,
        prompts: Sequence[str] | None = None,
        *,
        batch_size: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        eta: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        **kwargs: Any,
    ) -> SampleResult: ...

    def step_log_prob(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prev_timesteps: torch.Tensor,
        next_latents: torch.Tensor,
        conditioning: TextConditioning | None,
        *,
        eta: float = 1.0,
        guidance_scale: float = 5.0,
    ) -> StepOutput: ...

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def save_pretrained(self, directory: str) -> None: ...
