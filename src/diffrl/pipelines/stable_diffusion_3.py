"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``, rectified flow) as a policy.

What differs from :class:`~diffrl.pipelines.StableDiffusionPolicy` and nothing else: the trained network is the
MMDiT transformer (``pipeline.transformer``), the text conditioning is diffusers' ``encode_prompt`` of the two CLIPs
and the optional T5 (token states and a pooled embedding), the step is the flow SDE of
:class:`~diffrl.samplers.FlowMatchSchedule` (Flow-GRPO's, or CPS with ``model_options.sde_type: cps``; ``eta`` is the
noise level), the VAE's ``shift_factor``, and the LoRA layout ``StableDiffusion3Pipeline.load_lora_weights`` reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch
from diffusers import StableDiffusion3Pipeline

from diffrl.config import SharedConfig, Violation
from diffrl.config.shared import SIZE_FIELDS
from diffrl.pipelines import precision
from diffrl.pipelines.base import TrainableUNetPolicy
from diffrl.pipelines.lora import load_lora_state_dict, lora_state_dict
from diffrl.pipelines.saved import read_model_info
from diffrl.pipelines.stable_diffusion import StableDiffusionPolicy, per_prompt_negatives
from diffrl.pipelines.types import PooledTextConditioning, SampleResult
from diffrl.samplers import FLOW_SDE_TYPES, FlowMatchSchedule

_MAX_T5_TOKENS = 512


def _has_t5(name_or_path: str | os.PathLike, revision: str) -> bool:
    """Whether a model has its T5 encoder: a result records it; a local folder's ``model_index.json`` says so
    (diffusers writes ``[null, null]`` for a pipeline saved without it); anything else is assumed to."""
    info = read_model_info(name_or_path, revision) or {}
    if "use_t5" in info:
        return bool(info["use_t5"])
    index = Path(name_or_path).expanduser() / "model_index.json"
    if index.is_file():
        entry = json.loads(index.read_text(encoding="utf-8")).get("text_encoder_3")
        return bool(entry and entry[0])
    return True


class FlowPolicyMixin:
    """What the flow-matching families (SD3, FLUX.1) share beside the Stable Diffusion policy they extend: the flow
    schedule, the options ``sde_type`` and ``max_sequence_length``, the samplers and sizes they refuse, and LoRA
    files with the transformer's keys (``transformer.<module>.lora_A.weight``)."""

    denoiser_name: ClassVar[str] = "transformer"
    default_eta: ClassVar[float] = 0.7
    """The noise level ``sample()`` uses when none is given (Flow-GRPO's)."""
    linear_sigmas: ClassVar[bool] = False
    flow_options: ClassVar[dict[str, str]] = {
        "sde_type": "the stochastic step: 'sde' (Flow-GRPO's SDE, default) or 'cps' (coefficients-preserving)",
        "max_sequence_length": "T5 tokens per prompt (default 256; at most 512)",
    }

    @classmethod
    def option_violations(cls, options: Mapping[str, Any]) -> list[Violation]:
        violations = []
        sde = options.get("sde_type", "sde")
        if sde not in FLOW_SDE_TYPES:
            violations.append(Violation("model_options.sde_type", sde, "is not a flow SDE",
                                        f"use one of {', '.join(FLOW_SDE_TYPES)}"))
        length = options.get("max_sequence_length", 256)
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= _MAX_T5_TOKENS:
            violations.append(Violation("model_options.max_sequence_length", length,
                                        f"must be an integer from 1 to {_MAX_T5_TOKENS}", "e.g. 256"))
        return violations

    @classmethod
    def setting_violations(cls, config: SharedConfig, what: str) -> list[Violation]:
        """Besides the family's options: a sampler of noise-prediction models (DiffusionNFT's ``nft_sampler`` other
        than 'ddim', which on the flow path is the Euler step) and a stochastic chain with no noise."""
        violations = super().setting_violations(config, what)  # type: ignore[misc]
        sampler = getattr(config, "nft_sampler", "ddim")
        if sampler != "ddim":
            violations.append(Violation("nft_sampler", sampler, f"is a sampler of noise-prediction models; {what}, a "
                                        "flow-matching model", "set nft_sampler=ddim (the Euler ODE step at "
                                        "sample_eta=0, the flow SDE above)"))
        return violations

    def _make_schedule(self, pipeline: Any) -> FlowMatchSchedule:
        return FlowMatchSchedule.from_scheduler_config(pipeline.scheduler.config, self.sde_type,
                                                       linear_sigmas=self.linear_sigmas)

    def _init_flow(self, sde_type: str, max_sequence_length: int) -> None:
        problems = self.option_violations({"sde_type": sde_type, "max_sequence_length": max_sequence_length})
        if problems:
            raise ValueError(str(problems[0]))
        self.sde_type = sde_type
        self.max_sequence_length = max_sequence_length

    def configure(self, config: SharedConfig) -> None:
        """The run's VAE and the family's ``model_options`` (``sde_type``, ``max_sequence_length``)."""
        super().configure(config)
        options = config.model_options
        self.sde_type = options.get("sde_type", self.sde_type)
        self.schedule.sde_type = self.sde_type
        self.max_sequence_length = options.get("max_sequence_length", self.max_sequence_length)

    def size_factor(self) -> int:
        """Image sizes must be multiples of the VAE's factor times the transformer's patch size."""
        return self.vae_scale_factor * int(getattr(self._unet.config, "patch_size", 1) or 1)

    def loaded_violations(self, config: SharedConfig) -> list[Violation]:
        factor, violations = self.size_factor(), []
        for name in SIZE_FIELDS:
            value = getattr(config, name)
            if value is not None and value % factor:
                violations.append(Violation(name, value, f"is not a multiple of {factor}, the VAE factor times the "
                                            "transformer's patch size", f"set {name}={-(-value // factor) * factor}"))
        return violations

    def sample(self, prompts: Sequence[str] | None = None, **kwargs: Any) -> SampleResult:
        """As :meth:`StableDiffusionPolicy.sample`; ``eta`` (the SDE's noise level) defaults to 0.7."""
        kwargs.setdefault("eta", self.default_eta)
        return super().sample(prompts, **kwargs)

    # ----------------------------------------------------------------- LoRA files
    def load_lora_weights(self, source: str | os.PathLike) -> None:
        """Load diffusers-format LoRA weights (``pytorch_lora_weights.safetensors``; the transformer part) into the
        trainable adapter."""
        state = self.pipeline_class.lora_state_dict(os.fspath(source))
        state = state[0] if isinstance(state, tuple) else state  # some loaders return (state, alphas or metadata)
        prefix = f"{self.denoiser_name}."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not own:
            raise ValueError(f"'{source}' holds no {self.denoiser_name} LoRA weights (keys: {list(state)[:3]}).")
        load_lora_state_dict(self._unet, own, os.fspath(source))

    def _save_lora(self, directory: Path) -> None:
        self.pipeline_class.save_lora_weights(directory, transformer_lora_layers=lora_state_dict(self._unet),
                                              safe_serialization=True,
                                              transformer_lora_adapter_metadata=self.lora.peft_config().to_dict())

    def save_single_file(self, path: str | os.PathLike) -> None:
        TrainableUNetPolicy.save_single_file(self, path)

    def _model_info_extra(self) -> dict[str, Any]:
        return {"vae": self.vae_source, "sde_type": self.sde_type, "max_sequence_length": self.max_sequence_length,
                "use_t5": getattr(self.pipeline, "text_encoder_3", None) is not None}


class StableDiffusion3Policy(FlowPolicyMixin, StableDiffusionPolicy):
    """Stable Diffusion 3 / 3.5 sampled with a flow SDE as a Gaussian policy; LoRA on the transformer or full
    fine-tuning, classifier-free guidance when ``guidance_scale > 1``. ``text_encoder_3=None`` (no T5) works as in
    diffusers (its states are zeros). ``from_pretrained`` takes ``sde_type`` and ``max_sequence_length`` besides
    :class:`~diffrl.pipelines.StableDiffusionPolicy`'s settings."""

    kind = "sd3"
    description = "a Stable Diffusion 3 model"
    pipeline_class = StableDiffusion3Pipeline
    pipeline_class_names = frozenset({"StableDiffusion3Pipeline"})
    kohya_base_version = None
    model_options = FlowPolicyMixin.flow_options
    load_options = ("single_file_config", "vae", "use_t5")

    @classmethod
    def _split_options(cls, name_or_path: str | os.PathLike, revision: str,
                       options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``use_t5=False`` loads without the T5 encoder (diffusers' ``text_encoder_3=None``: its states are zeros,
        SD3's memory saver); a folder saved without it, or a result of one, loads without it by itself."""
        use_t5 = options.pop("use_t5", None)
        load_kwargs, init_kwargs = super()._split_options(name_or_path, revision, options)
        if use_t5 is None:
            use_t5 = _has_t5(name_or_path, revision)
        if not use_t5:
            load_kwargs.update(text_encoder_3=None, tokenizer_3=None)
        return load_kwargs, init_kwargs

    def __init__(self, pipeline: StableDiffusion3Pipeline, *, sde_type: str = "sde", max_sequence_length: int = 256,
                 **settings: Any) -> None:
        """``sde_type``: "sde" or "cps"; ``max_sequence_length``: T5 tokens per prompt; ``settings``: as for
        :class:`~diffrl.pipelines.StableDiffusionPolicy`."""
        self._init_flow(sde_type, max_sequence_length)
        super().__init__(pipeline, **settings)

    def _frozen_modules(self) -> list[torch.nn.Module]:
        p = self.pipeline
        return [m for m in (p.vae, p.text_encoder, p.text_encoder_2, p.text_encoder_3) if m is not None]

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | str | None = None,
                       guidance: bool = True, *, height: int | None = None,
                       width: int | None = None) -> PooledTextConditioning:
        """Both CLIPs' and T5's states and the pooled CLIP embedding, for ``prompts`` and, with guidance, the
        negative prompts (empty if none): diffusers' ``encode_prompt``."""
        negative_prompts = per_prompt_negatives(prompts, negative_prompts)
        with torch.no_grad(), self.autocast():
            pos, neg, pooled, neg_pooled = self.pipeline.encode_prompt(
                list(prompts), None, None, device=self.device, do_classifier_free_guidance=guidance,
                negative_prompt=negative_prompts, max_sequence_length=self.max_sequence_length)
        if not guidance:
            neg = neg_pooled = None
        return PooledTextConditioning(pos, neg, pooled, neg_pooled)

    def predict(self, x: torch.Tensor, t: torch.Tensor, conditioning: PooledTextConditioning | None,
                guidance_scale: float, *, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The velocity at ``x_t`` (float32) for timesteps ``t = 1000 sigma``, with classifier-free guidance when
        negative states are present; ``params`` replace trainable weights for this call."""
        if conditioning is None:
            raise ValueError("Stable Diffusion 3 needs text conditioning; pass prompts (an empty string is allowed).")
        guided = conditioning.negative_prompt_embeds is not None and guidance_scale > 1.0
        dtype = precision.module_dtype(self._unet)
        net = self._network(params)
        c = conditioning
        with self.autocast():
            if guided:
                out = net(hidden_states=torch.cat([x, x]).to(dtype), timestep=torch.cat([t, t]),
                          encoder_hidden_states=torch.cat([c.negative_prompt_embeds, c.prompt_embeds]).to(dtype),
                          pooled_projections=torch.cat([c.negative_pooled_prompt_embeds,
                                                        c.pooled_prompt_embeds]).to(dtype), return_dict=False)[0]
                uncond, cond = out.float().chunk(2)
                return uncond + guidance_scale * (cond - uncond)
            return net(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=c.prompt_embeds.to(dtype),
                       pooled_projections=c.pooled_prompt_embeds.to(dtype), return_dict=False)[0].float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in ``[0, 1]``: ``latents / scaling_factor + shift_factor`` through the VAE."""
        vae = self.pipeline.vae
        scaled = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        with self.autocast():
            images = vae.decode(scaled.to(precision.module_dtype(vae))).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)
