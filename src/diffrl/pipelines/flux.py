"""FLUX.1 (``FluxTransformer2DModel``, rectified flow, guidance-distilled) as a policy.

What differs from Stable Diffusion 3 (:mod:`diffrl.pipelines.stable_diffusion_3`) and nothing else: the conditioning
(CLIP's pooled embedding and T5's states, no negative prompts), the transformer call (latents packed into 2x2 patches
with their position ids, timesteps as ``t`` in ``[0, 1]``, FLUX.1-dev's guidance embedding instead of
classifier-free guidance) and the schedule (``sigmas = linspace(1, 1/N, N)`` shifted by ``mu``, which grows with the
image's token count). Trajectories hold unpacked latents ``[B, C, h, w]``; packing happens inside :meth:`predict`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from diffrl.config import SharedConfig, Violation
from diffrl.pipelines import precision
from diffrl.pipelines.flow_base import FlowPolicyMixin
from diffrl.pipelines.stable_diffusion import StableDiffusionPolicy
from diffrl.pipelines.types import PooledTextConditioning

DEV_GUIDANCE = 3.5
"""FLUX.1-dev's default guidance embedding (diffusers' and Black Forest Labs' examples)."""


class FluxPolicy(FlowPolicyMixin, StableDiffusionPolicy):
    """FLUX.1 sampled with a flow SDE as a Gaussian policy; LoRA on the transformer or full fine-tuning.

    FLUX.1 is guidance-distilled: it samples without classifier-free guidance (``guidance_scale`` 1, no negative
    prompts); FLUX.1-dev's transformer takes the guidance strength as an input instead (``guidance``, 3.5 by
    default; ``model_options.guidance`` of a run), the same value for sampling and training. ``from_pretrained``
    takes ``guidance``, ``sde_type`` and ``max_sequence_length`` besides the Stable Diffusion policy's settings.
    """

    kind = "flux"
    description = "a FLUX.1 model"
    pipeline_class = FluxPipeline
    pipeline_class_names = frozenset({"FluxPipeline"})
    kohya_base_version = None
    linear_sigmas = True
    model_options = {**FlowPolicyMixin.flow_options,
                     "max_sequence_length": "T5 tokens per prompt (default 512; at most 512)",
                     "guidance": f"FLUX.1-dev's guidance embedding (default {DEV_GUIDANCE}; not for models without "
                                 "one, such as FLUX.1-schnell)"}

    def __init__(self, pipeline: FluxPipeline, *, guidance: float | None = None, sde_type: str = "sde",
                 max_sequence_length: int = 512, text_encoders_on_cpu: bool = False, **settings: Any) -> None:
        """``guidance``: the guidance embedding of FLUX.1-dev (None: 3.5 where the transformer has one);
        ``sde_type``, ``max_sequence_length``: as for SD3; ``settings``: as for
        :class:`~diffrl.pipelines.StableDiffusionPolicy`."""
        self._init_flow(sde_type, max_sequence_length, text_encoders_on_cpu)
        embeds = bool(pipeline.transformer.config.guidance_embeds)
        if guidance is not None and not embeds:
            raise ValueError(f"guidance={guidance}: this FLUX.1 transformer has no guidance embedding (FLUX.1-schnell "
                             "is timestep-distilled); leave guidance unset")
        self.guidance = (DEV_GUIDANCE if guidance is None else float(guidance)) if embeds else None
        super().__init__(pipeline, **settings)
        self._set_mu(None, None)

    # ----------------------------------------------------------------- the family's settings
    @classmethod
    def option_violations(cls, options: Mapping[str, Any]) -> list[Violation]:
        violations = super().option_violations(options)
        value = options.get("guidance", DEV_GUIDANCE)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            violations.append(Violation("model_options.guidance", value, "must be a positive number",
                                        f"e.g. {DEV_GUIDANCE} (FLUX.1-dev's default)"))
        return violations

    @classmethod
    def setting_violations(cls, config: SharedConfig, what: str) -> list[Violation]:
        """Classifier-free guidance cannot be applied to a guidance-distilled model: ``sample_guidance_scale``
        must be 1 and no negative prompts given (the guidance strength is ``model_options.guidance``)."""
        violations = super().setting_violations(config, what)
        if config.sample_guidance_scale != 1.0:
            violations.append(Violation("sample_guidance_scale", config.sample_guidance_scale,
                                        f"is classifier-free guidance, which {what} (guidance-distilled) does not use",
                                        "set sample_guidance_scale=1; FLUX.1-dev's guidance strength is "
                                        f"model_options.guidance (default {DEV_GUIDANCE})"))
        if config.negative_prompt_list:
            violations.append(Violation("negative_prompts", config.negative_prompts,
                                        f"need classifier-free guidance, which {what} (guidance-distilled) does not use",
                                        "remove negative_prompts"))
        return violations

    def loaded_violations(self, config: SharedConfig) -> list[Violation]:
        violations = super().loaded_violations(config)
        if "guidance" in config.model_options and self.guidance is None:
            violations.append(Violation("model_options.guidance", config.model_options["guidance"],
                                        "cannot be set: this FLUX.1 transformer has no guidance embedding "
                                        "(FLUX.1-schnell)", "remove model_options.guidance"))
        return violations

    def configure(self, config: SharedConfig) -> None:
        super().configure(config)
        if self.guidance is not None and "guidance" in config.model_options:
            self.guidance = float(config.model_options["guidance"])

    def _model_info_extra(self) -> dict[str, Any]:
        return {**super()._model_info_extra(), "guidance": self.guidance}

    def size_factor(self) -> int:
        """Latents are packed in 2x2 patches: sizes are multiples of twice the VAE's factor."""
        return 2 * self.vae_scale_factor

    # ----------------------------------------------------------------- pieces
    def _frozen_modules(self) -> list[torch.nn.Module]:
        return [self.pipeline.vae, self.pipeline.text_encoder, self.pipeline.text_encoder_2]

    def _latent_shape(self, batch_size: int, height: int | None, width: int | None) -> tuple[int, ...]:
        factor = self.vae_scale_factor
        default = self.pipeline.default_sample_size * factor
        h = 2 * ((height or default) // (factor * 2))
        w = 2 * ((width or default) // (factor * 2))
        return (batch_size, self._unet.config.in_channels // 4, h, w)

    def _set_mu(self, height: int | None, width: int | None) -> None:
        """The schedule's shift for images of ``height x width`` (None: the default size)."""
        _, _, h, w = self._latent_shape(1, height, width)
        self._set_mu_for_latents(h, w)

    def _set_mu_for_latents(self, h: int, w: int) -> None:
        """The schedule's resolution-dependent shift for ``h x w`` latents (diffusers' ``calculate_shift`` of the
        packed token count), as FluxPipeline computes it."""
        config = self.pipeline.scheduler.config
        self.schedule.set_mu(calculate_shift((h // 2) * (w // 2), config.get("base_image_seq_len", 256),
                                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                             config.get("max_shift", 1.15)))

    def initial_noise(self, batch_size: int, generator=None, height: int | None = None,
                      width: int | None = None) -> torch.Tensor:
        """``x_T`` for images of ``height x width``, and the schedule's shift for that size."""
        self._set_mu(height, width)
        return super().initial_noise(batch_size, generator, height, width)

    def _run(self, conditioning: Any, prompts: list[str], batch: int, latents: torch.Tensor | None, generator,
             height: int | None = None, width: int | None = None, **chain: Any):
        """Given initial latents, the schedule's shift follows their size (not the default image size)."""
        if latents is not None:
            self._set_mu_for_latents(*latents.shape[-2:])
        return super()._run(conditioning, prompts, batch, latents, generator, height, width, **chain)

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | str | None = None,
                       guidance: bool = True, *, height: int | None = None,
                       width: int | None = None) -> PooledTextConditioning:
        """T5's states and CLIP's pooled embedding (diffusers' ``encode_prompt``); no negative states."""
        if negative_prompts:
            raise ValueError("FLUX.1 is guidance-distilled and takes no negative prompts; remove them")
        with torch.no_grad(), self.autocast():
            states, pooled, _ = self.pipeline.encode_prompt(list(prompts), None, device=self._encoding_device(),
                                                            max_sequence_length=self.max_sequence_length)
        return PooledTextConditioning(states.to(self.device), None, pooled.to(self.device), None)

    def sample(self, prompts: Sequence[str] | None = None, **kwargs: Any):
        """As :meth:`StableDiffusionPolicy.sample`, without classifier-free guidance (``guidance_scale`` 1)."""
        kwargs.setdefault("guidance_scale", 1.0)
        return super().sample(prompts, **kwargs)

    def predict(self, x: torch.Tensor, t: torch.Tensor, conditioning: PooledTextConditioning | None,
                guidance_scale: float, *, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The velocity ``[B, C, h, w]`` at ``x_t`` (float32) for timesteps ``t = 1000 sigma``: latents packed, the
        transformer called with ``t / 1000`` and, for FLUX.1-dev, :attr:`guidance`; ``params`` replace trainable
        weights for this call."""
        if conditioning is None:
            raise ValueError("FLUX.1 needs text conditioning; pass prompts (an empty string is allowed).")
        if guidance_scale > 1.0:
            raise ValueError(f"guidance_scale={guidance_scale}: FLUX.1 is guidance-distilled and samples without "
                             f"classifier-free guidance; use 1 (FLUX.1-dev's strength is `guidance`, {self.guidance})")
        b, c, h, w = x.shape
        dtype = precision.module_dtype(self._unet)
        packed = FluxPipeline._pack_latents(x, b, c, h, w).to(dtype)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, dtype)
        text_ids = torch.zeros(conditioning.prompt_embeds.shape[1], 3, device=x.device, dtype=dtype)
        embedded = None if self.guidance is None else torch.full((b,), self.guidance, device=x.device)
        with self.autocast():
            out = self._network(params)(hidden_states=packed, timestep=t / 1000, guidance=embedded,
                                        pooled_projections=conditioning.pooled_prompt_embeds.to(dtype),
                                        encoder_hidden_states=conditioning.prompt_embeds.to(dtype), txt_ids=text_ids,
                                        img_ids=image_ids, return_dict=False)[0]
        factor = self.vae_scale_factor
        return FluxPipeline._unpack_latents(out.float(), h * factor, w * factor, factor)
