"""What the flow-matching families (SD3, FLUX.1) share beside the Stable Diffusion policy they extend: the flow
schedule and its options, the samplers and sizes they refuse, decoding through a shifted VAE, and LoRA files in the
transformer's layout (``transformer.<module>.lora_A.weight``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import torch

from diffrl.config import SharedConfig, Violation
from diffrl.config.shared import SIZE_FIELDS
from diffrl.pipelines import precision
from diffrl.pipelines.base import TrainableUNetPolicy
from diffrl.pipelines.lora import load_lora_state_dict, lora_state_dict
from diffrl.pipelines.types import SampleResult
from diffrl.samplers import FLOW_SDE_TYPES, FlowMatchSchedule

_MAX_T5_TOKENS = 512


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
        "text_encoders_on_cpu": "keep the text encoders (T5 included) on the CPU and encode there, the states moved "
                                "to the accelerator (default false)",
    }
    load_time_options: ClassVar[tuple[str, ...]] = ("text_encoders_on_cpu",)
    text_encoders_on_cpu: bool = False

    def _text_encoders(self) -> list[torch.nn.Module]:
        p = self.pipeline  # type: ignore[attr-defined]
        return [m for m in (getattr(p, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3"))
                if m is not None]

    def to(self, device: torch.device | str | None = None, mixed_precision: str | None = None):
        """As every policy; with ``text_encoders_on_cpu`` the text encoders stay on the CPU (in the run's precision)."""
        super().to(device, mixed_precision)  # type: ignore[misc]
        if self.text_encoders_on_cpu:
            for module in self._text_encoders():
                module.to("cpu")
        return self

    def _encoding_device(self) -> torch.device:
        """Where the text encoders run: the policy's device, or the CPU with ``text_encoders_on_cpu``."""
        return torch.device("cpu") if self.text_encoders_on_cpu else self.device  # type: ignore[attr-defined]

    @classmethod
    def option_violations(cls, options: Mapping[str, Any]) -> list[Violation]:
        violations = []
        sde = options.get("sde_type", "sde")
        if sde not in FLOW_SDE_TYPES:
            violations.append(Violation("model_options.sde_type", sde, "is not a flow SDE",
                                        f"use one of {', '.join(FLOW_SDE_TYPES)}"))
        offload = options.get("text_encoders_on_cpu", False)
        if not isinstance(offload, bool):
            violations.append(Violation("model_options.text_encoders_on_cpu", offload, "must be true or false",
                                        "set it to true or false"))
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

    def _init_flow(self, sde_type: str, max_sequence_length: int, text_encoders_on_cpu: bool = False) -> None:
        problems = self.option_violations({"sde_type": sde_type, "max_sequence_length": max_sequence_length,
                                           "text_encoders_on_cpu": text_encoders_on_cpu})
        if problems:
            raise ValueError(str(problems[0]))
        self.sde_type = sde_type
        self.max_sequence_length = max_sequence_length
        self.text_encoders_on_cpu = text_encoders_on_cpu

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

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in ``[0, 1]``: ``latents / scaling_factor + shift_factor`` through the VAE."""
        vae = self.pipeline.vae
        scaled = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        with self.autocast():
            images = vae.decode(scaled.to(precision.module_dtype(vae))).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

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
        return {"vae": self.vae_source, "sde_type": self.sde_type, "max_sequence_length": self.max_sequence_length}
