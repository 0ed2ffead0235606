"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``, rectified flow) as a policy; the flow families' shared part is
:class:`~diffrl.pipelines.flow_base.FlowPolicyMixin`.

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
from typing import Any, Mapping, Sequence

import torch
from diffusers import StableDiffusion3Pipeline

from diffrl.config import Violation
from diffrl.pipelines import precision
from diffrl.pipelines.flow_base import FlowPolicyMixin
from diffrl.pipelines.saved import read_model_info
from diffrl.pipelines.stable_diffusion import StableDiffusionPolicy, per_prompt_negatives
from diffrl.pipelines.types import PooledTextConditioning

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
    load_options = ("single_file_config", "vae", "use_t5")
    load_time_options = ("text_encoders_on_cpu", "use_t5")
    model_options = {**FlowPolicyMixin.flow_options,
                     "use_t5": "load the T5 encoder (default true; false: its states are zeros, as diffusers' "
                               "text_encoder_3=None)"}

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
                 text_encoders_on_cpu: bool = False, **settings: Any) -> None:
        """``sde_type``: "sde" or "cps"; ``max_sequence_length``: T5 tokens per prompt; ``text_encoders_on_cpu``:
        encode on the CPU (the encoders never reach the accelerator); ``settings``: as for
        :class:`~diffrl.pipelines.StableDiffusionPolicy`."""
        self._init_flow(sde_type, max_sequence_length, text_encoders_on_cpu)
        super().__init__(pipeline, **settings)

    @classmethod
    def option_violations(cls, options: Mapping[str, Any]) -> list[Violation]:
        violations = super().option_violations(options)
        if not isinstance(options.get("use_t5", True), bool):
            violations.append(Violation("model_options.use_t5", options["use_t5"], "must be true or false",
                                        "set it to true or false"))
        return violations

    def _model_info_extra(self) -> dict[str, Any]:
        return {**super()._model_info_extra(), "use_t5": self.pipeline.text_encoder_3 is not None}

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
                list(prompts), None, None, device=self._encoding_device(), do_classifier_free_guidance=guidance,
                negative_prompt=negative_prompts, max_sequence_length=self.max_sequence_length)
        if not guidance:
            neg = neg_pooled = None
        return PooledTextConditioning(*(None if x is None else x.to(self.device) for x in (pos, neg, pooled, neg_pooled)))

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
