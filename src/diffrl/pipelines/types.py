"""Typed containers and the one interface every policy implements."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, NamedTuple, Protocol, Sequence, runtime_checkable

import torch

from diffrl.algorithms.truncation import GradientPlan
from diffrl.samplers import DenoisingSchedule, FlowMatchSchedule
from diffrl.samplers import StepOutput


class TextConditioning(NamedTuple):
    """What a text-conditioned UNet needs for one batch (``L`` tokens, ``D`` embedding width).

    Trainers treat conditioning opaquely through :meth:`index`, :meth:`concat` and :meth:`without_guidance`;
    a policy with more conditioning (SDXL's pooled embeddings and time ids) has its own NamedTuple with the
    same methods and the same ``prompt_embeds`` field.

    Attributes:
        prompt_embeds: ``[B, L, D]`` text-encoder states of the prompts.
        negative_prompt_embeds: ``[B, L, D]`` states of the negative (or empty) prompts used by
            classifier-free guidance; ``None`` when sampled without guidance.
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None

    def index(self, idx: torch.Tensor | slice) -> "TextConditioning":
        """The rows ``idx`` of every field."""
        neg = None if self.negative_prompt_embeds is None else self.negative_prompt_embeds[idx]
        return TextConditioning(self.prompt_embeds[idx], neg)

    @classmethod
    def concat(cls, items: Sequence["TextConditioning"]) -> "TextConditioning":
        """Stack batches along the batch dimension; all or none of them must carry negative states."""
        if not items:
            raise ValueError("TextConditioning.concat needs at least one item.")
        negs = [c.negative_prompt_embeds for c in items]
        if any(n is None for n in negs) and not all(n is None for n in negs):
            raise ValueError("TextConditioning.concat got batches with and without negative_prompt_embeds; "
                             "encode them all with guidance or all without.")
        neg = None if negs[0] is None else torch.cat(negs)
        return cls(torch.cat([c.prompt_embeds for c in items]), neg)

    def without_guidance(self) -> "TextConditioning":
        """The same prompts with the negative states dropped: the policy then predicts without guidance."""
        return self._replace(negative_prompt_embeds=None)


def rows_of_fields(conditioning: Any, idx: torch.Tensor | slice) -> Any:
    """The rows ``idx`` of every tensor field of a conditioning NamedTuple (``None`` fields stay ``None``)."""
    return type(conditioning)(*(None if x is None else x[idx] for x in conditioning))


def concat_fields(cls: type, items: Sequence[Any]) -> Any:
    """A conditioning NamedTuple ``cls`` stacking ``items`` along the batch axis, field by field; a field is kept
    only when every item has it (negatives of batches sampled without guidance are ``None``)."""
    if not items:
        raise ValueError(f"{cls.__name__}.concat needs at least one item.")
    return cls(*(None if any(v is None for v in values) else torch.cat(list(values)) for values in zip(*items)))


class PooledTextConditioning(NamedTuple):
    """What a text-conditioned transformer with a pooled text embedding needs (SD3, FLUX.1): ``L`` tokens, ``D``
    states' width, ``P`` pooled width.

    Attributes:
        prompt_embeds: ``[B, L, D]`` the prompts' token states (SD3: both CLIPs' padded to T5's width, then T5's).
        negative_prompt_embeds: ``[B, L, D]`` the negative (or empty) prompts' states for classifier-free guidance;
            ``None`` when sampled without guidance.
        pooled_prompt_embeds: ``[B, P]`` the pooled text embedding.
        negative_pooled_prompt_embeds: ``[B, P]`` or ``None``, as ``negative_prompt_embeds``.
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    pooled_prompt_embeds: torch.Tensor
    negative_pooled_prompt_embeds: torch.Tensor | None

    def index(self, idx: torch.Tensor | slice) -> "PooledTextConditioning":
        """The rows ``idx`` of every field."""
        return rows_of_fields(self, idx)

    @classmethod
    def concat(cls, items: Sequence["PooledTextConditioning"]) -> "PooledTextConditioning":
        """Stack batches along the batch axis; negatives are kept only when every item has them."""
        return concat_fields(cls, items)

    def without_guidance(self) -> "PooledTextConditioning":
        """The same prompts with the negative states dropped: the policy then predicts without guidance."""
        return self._replace(negative_prompt_embeds=None, negative_pooled_prompt_embeds=None)


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
        stochastic: ``[B, N]`` bool, whether each transition was stochastic (drawn with noise, exact
            log-probability) or deterministic (``eta = 0``, log-probability recorded as 0); see ``sde_steps``
            of :meth:`DiffusionPolicy.sample`. ``None`` in trajectories built without it (every step as sampled).
        means: ``[B, N, C, h, w]`` the mean of each transition's Gaussian under the sampling weights (sampled with
            ``record_means=True``, for a trust region around the sampling policy); ``None`` otherwise.
    """

    images: torch.Tensor
    latents: torch.Tensor
    timesteps: torch.Tensor
    prev_timesteps: torch.Tensor
    log_probs: torch.Tensor
    conditioning: TextConditioning | None
    prompts: list[str]
    stochastic: torch.Tensor | None = None
    means: torch.Tensor | None = None

    def rows(self, idx: slice) -> "Trajectory":
        """The samples ``idx`` of this batch, every field cut the same way."""
        cond = None if self.conditioning is None else self.conditioning.index(idx)
        return Trajectory(self.images[idx], self.latents[idx], self.timesteps[idx], self.prev_timesteps[idx],
                          self.log_probs[idx], cond, list(self.prompts[idx]),
                          None if self.stochastic is None else self.stochastic[idx],
                          None if self.means is None else self.means[idx])


class SampleResult(NamedTuple):
    """Output of :meth:`DiffusionPolicy.sample`: the trajectory and, when sampling with gradients, the
    differentiable images (``[B, 3, H, W]``, attached to the graph) that :attr:`Trajectory.images` detaches."""

    trajectory: Trajectory
    images_with_grad: torch.Tensor | None


@runtime_checkable
class DiffusionPolicy(Protocol):
    """A diffusion model seen as a policy over denoising trajectories: the interface every trainer uses.

    Implemented by :class:`~diffrl.pipelines.StableDiffusionPolicy` and :class:`~diffrl.pipelines.DDPMPolicy`
    (through :class:`~diffrl.pipelines.base.TrainableUNetPolicy`). Shapes: ``B`` batch, ``C, h, w`` latent (or
    pixel) shape. ``params`` arguments are optional ``name -> tensor`` maps that replace trainable parameters
    (names as in :meth:`trainable_state_dict`) for that one call: an EMA "old" policy, or the frozen
    reference from :meth:`reference_params`.
    """

    is_conditional: bool
    unet: torch.nn.Module
    """What forward passes call: :attr:`trainable_module`, or the wrapper given to :meth:`use_forward_module`."""
    num_train_timesteps: int
    schedule: DenoisingSchedule | FlowMatchSchedule

    @property
    def device(self) -> torch.device: ...

    @property
    def trainable_module(self) -> torch.nn.Module:
        """The UNet itself (never a distributed wrapper): the module whose parameters are trained and saved."""
        ...

    def train(self, mode: bool = True) -> Any:
        """Training mode for the trained module (``mode=False``: evaluation mode)."""
        ...

    def eval(self) -> Any:
        """Evaluation mode for the trained module (sampling)."""
        ...

    def use_forward_module(self, module: torch.nn.Module) -> None:
        """Make forward passes call ``module`` (e.g. accelerate's DDP wrapper of :attr:`trainable_module`)."""
        ...

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the parameters that require grad (LoRA adapters or the whole UNet)."""
        ...

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy ``state`` (from :meth:`trainable_state_dict`) in; a key mismatch is a ``ValueError`` naming it."""
        ...

    def snapshot_reference(self, device: torch.device | str | None = None) -> None:
        """Full fine-tuning: freeze a copy of the current weights as the reference (LoRA: nothing to do)."""
        ...

    def reference_params(self) -> Mapping[str, torch.Tensor]:
        """``params`` that make a forward pass the frozen pre-fine-tuning model (no gradients)."""
        ...

    def sample(
        self,
        prompts: Sequence[str] | None = None,
        *,
        batch_size: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        eta: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        sde_steps: Sequence[bool] | None = None,
        **kwargs: Any,
    ) -> SampleResult: ...

    def predict(self, x: torch.Tensor, t: torch.Tensor, conditioning: Any, guidance_scale: float, *,
                params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``[B, C, h, w]`` float32 model output (guided when the conditioning has negative states)."""
        ...

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, conditioning: Any, guidance_scale: float = 1.0, *,
                   params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``[B, C, h, w]`` the model's differentiable estimate of ``x_0`` (any prediction type)."""
        ...

    def noise_to(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The forward process: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        ...

    def step_log_prob(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prev_timesteps: torch.Tensor,
        next_latents: torch.Tensor,
        conditioning: Any,
        *,
        eta: float = 1.0,
        guidance_scale: float = 5.0,
        params: Mapping[str, torch.Tensor] | None = None,
    ) -> StepOutput: ...

    def sample_for_plan(self, prompts: Sequence[str] | None, plan: GradientPlan, *,
                        gradient_checkpointing: bool = False, **sample_kwargs: Any) -> torch.Tensor:
        """Differentiable images for a reward-backpropagation plan (truncated suffix, ReFL, DRaFT-LV)."""
        ...

    def decode(self, x: torch.Tensor) -> torch.Tensor: ...

    def save_pretrained(self, directory: str) -> None: ...
