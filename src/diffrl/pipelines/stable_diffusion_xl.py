"""Stable Diffusion XL (two CLIP text encoders, ``text_time`` added conditioning) as a policy.

What differs from :class:`~diffrl.pipelines.StableDiffusionPolicy` and nothing else: the conditioning (both
encoders' penultimate hidden states concatenated, the second encoder's pooled embedding, and the six
size/crop numbers of Podell et al. 2023, sec. 2.2), the UNet call that consumes it, the VAE's ``force_upcast``
and the diffusers layouts SDXL results are saved in. Step math, the chain and LoRA come from the shared code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from diffusers import StableDiffusionXLPipeline

from diffrl.config import SharedConfig, Violation
from diffrl.pipelines import precision
from diffrl.pipelines.saved import read_model_info
from diffrl.pipelines.single_file import sdxl_checkpoint
from diffrl.pipelines.stable_diffusion import StableDiffusionPolicy, per_prompt_negatives
from diffrl.pipelines.types import SampleResult, concat_fields, rows_of_fields

Size = tuple[int, int]

# A key only SDXL base checkpoints (original/A1111 layout) have: the OpenCLIP-bigG second text encoder.
_SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1.model."


class SDXLConditioning(NamedTuple):
    """What the SDXL UNet needs for one batch (``L`` tokens, ``D`` = sum of both encoders' widths, ``P`` pooled width).

    Attributes:
        prompt_embeds: ``[B, L, D]`` both text encoders' penultimate hidden states, concatenated on the last axis.
        negative_prompt_embeds: ``[B, L, D]`` the same for the negative prompts (zeros under
            ``force_zeros_for_empty_prompt``); ``None`` when sampled without guidance.
        pooled_prompt_embeds: ``[B, P]`` the second encoder's projected pooled embedding.
        negative_pooled_prompt_embeds: ``[B, P]`` or ``None``, as ``negative_prompt_embeds``.
        add_time_ids: ``[B, 6]`` float32 ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``; the
            unconditional branch uses the same numbers (as diffusers does by default).
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    pooled_prompt_embeds: torch.Tensor
    negative_pooled_prompt_embeds: torch.Tensor | None
    add_time_ids: torch.Tensor

    def index(self, idx: torch.Tensor | slice) -> "SDXLConditioning":
        """The rows ``idx`` of every tensor."""
        return rows_of_fields(self, idx)

    @classmethod
    def concat(cls, items: Sequence["SDXLConditioning"]) -> "SDXLConditioning":
        """Stack batches along the batch axis; negatives are kept only when every item has them."""
        return concat_fields(cls, items)

    def without_guidance(self) -> "SDXLConditioning":
        """The same batch with the negative (unconditional) states dropped."""
        return self._replace(negative_prompt_embeds=None, negative_pooled_prompt_embeds=None)


def add_time_ids(original_size: Size, crops_coords_top_left: Size, target_size: Size, batch_size: int,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """``[B, 6]`` SDXL micro-conditioning (Podell et al. 2023, sec. 2.2): original size, crop top-left, target size."""
    numbers = [*original_size, *crops_coords_top_left, *target_size]
    return torch.tensor([numbers], dtype=torch.float32, device=device).repeat(batch_size, 1)


def is_sdxl_single_file(path: str | os.PathLike) -> bool:
    """Whether a ``.safetensors`` single-file checkpoint holds an SDXL base model (read from its header only)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return any(k.startswith(_SDXL_SINGLE_FILE_KEY) for k in f.keys())
    except Exception:  # noqa: BLE001 - unreadable: let the loader report it
        return False


class StableDiffusionXLPolicy(StableDiffusionPolicy):
    """SDXL sampled with DDIM (``eta > 0``) as a Gaussian policy; LoRA on the UNet or full fine-tuning.

    ``original_size`` / ``target_size`` (``(height, width)``; default: the sampled image size) and
    ``crops_coords_top_left`` (default ``(0, 0)``) set ``add_time_ids``. With ``mixed_precision="fp16"`` a VAE whose
    config sets ``force_upcast`` (SDXL's overflows in fp16) is kept and run in float32; pass an fp16-safe VAE
    (``vae=`` in :meth:`from_pretrained`) to decode in half precision instead.
    """

    kind = "sdxl"
    description = "an SDXL model"
    pipeline_class = StableDiffusionXLPipeline
    pipeline_class_names = frozenset({"StableDiffusionXLPipeline"})
    kohya_base_version = "sdxl_base_v1-0"
    single_file_architecture = "stable-diffusion-xl-v1-base"

    def _single_file_state(self, unet: torch.nn.Module) -> dict[str, torch.Tensor]:
        """SDXL: UNet, VAE, CLIP-L (``conditioner.embedders.0``) and OpenCLIP-bigG in open_clip's layout
        (``conditioner.embedders.1.model``)."""
        p = self.pipeline
        return sdxl_checkpoint(unet, p.vae, p.text_encoder, p.text_encoder_2)
    model_options = {
        "original_size": "[height, width] of the add_time_ids size conditioning (null: the sampled size)",
        "target_size": "[height, width] of add_time_ids (null: the sampled size)",
        "crops_coords_top_left": "[top, left] crop of add_time_ids ([0, 0]: centred, uncropped images)",
    }

    @classmethod
    def option_violations(cls, options: Mapping[str, Any]) -> list[Violation]:
        """Sizes are two positive pixel counts (or null); the crop is two offsets >= 0."""
        violations = []
        for name, value in options.items():
            crop = name == "crops_coords_top_left"
            if value is None and not crop:
                continue
            pair = isinstance(value, (list, tuple)) and len(value) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value)
            if not pair or min(value) < (0 if crop else 1):
                words = "two offsets >= 0 (top, left)" if crop else "two positive sizes (height, width)"
                example = "[0,0] (no crop)" if crop else "[1024,1024], or null for the sampled size"
                violations.append(Violation(f"model_options.{name}", value, f"must be {words} in pixels",
                                            f"e.g. model_options.{name}={example}"))
        return violations

    def configure(self, config: SharedConfig) -> None:
        """The run's VAE and its size conditioning (``model_options``; unset: what a loaded diffrl result
        recorded)."""
        super().configure(config)
        for name, value in config.model_options.items():
            setattr(self, name, tuple(value) if value is not None else None)

    def __init__(self, pipeline: StableDiffusionXLPipeline, *, original_size: Size | None = None,
                 crops_coords_top_left: Size = (0, 0), target_size: Size | None = None, **settings: Any) -> None:
        """``settings``: as for :class:`~diffrl.pipelines.StableDiffusionPolicy` (``vae_source``, ``use_lora``,
        ...)."""
        _check_added_conditioning(pipeline)
        self.original_size = tuple(original_size) if original_size is not None else None
        self.crops_coords_top_left = tuple(crops_coords_top_left)
        self.target_size = tuple(target_size) if target_size is not None else None
        super().__init__(pipeline, **settings)

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, vae: str | os.PathLike | None = None,
                        original_size: Size | None = None, crops_coords_top_left: Size | None = None,
                        target_size: Size | None = None, **options: Any) -> "StableDiffusionXLPolicy":
        """Load from a Hub id, a diffusers folder, a single-file SDXL checkpoint, or an SDXL result saved by diffrl
        (its base model, VAE, size conditioning and LoRA adapter, ready to continue training).

        ``vae`` replaces the pipeline's VAE (a folder, single file or Hub id; see
        :func:`~diffrl.pipelines.loading.load_vae`); ``options``:
        as for :meth:`StableDiffusionPolicy.from_pretrained` (``revision``, ``use_lora``, ``lora``,
        ``lora_weights``, ``mixed_precision``, ``device``, ``single_file_config``)."""
        return super().from_pretrained(name_or_path, vae=vae, original_size=original_size,
                                       crops_coords_top_left=crops_coords_top_left, target_size=target_size,
                                       **options)

    @classmethod
    def _split_options(cls, name_or_path: str | os.PathLike, revision: str,
                       options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """As for Stable Diffusion (the VAE); unset size conditioning is taken from a saved result."""
        load_kwargs, init_kwargs = super()._split_options(name_or_path, revision, options)
        info = read_model_info(name_or_path, revision) or {}
        saved = info.get("sdxl", {}) if info.get("kind") == cls.kind else {}
        for name in ("original_size", "target_size"):
            init_kwargs[name] = init_kwargs.get(name) or saved.get(name)
        init_kwargs["crops_coords_top_left"] = (init_kwargs.get("crops_coords_top_left")
                                                or saved.get("crops_coords_top_left") or (0, 0))
        return load_kwargs, init_kwargs

    def _frozen_modules(self) -> list[torch.nn.Module]:
        return [self.pipeline.vae, self.pipeline.text_encoder, self.pipeline.text_encoder_2]

    def to(self, device: torch.device | str | None = None, mixed_precision: str | None = None):
        """As the base class; a ``force_upcast`` VAE stays float32 under fp16."""
        super().to(device, mixed_precision)
        if self._vae_upcast:
            precision.place(self.pipeline.vae, self.device, torch.float32)
        return self

    @property
    def _vae_upcast(self) -> bool:
        vae = self.pipeline.vae
        return precision.weight_dtype(self.mixed_precision) == torch.float16 and bool(vae.config.force_upcast)

    # ----------------------------------------------------------------- pieces
    def image_size(self, height: int | None = None, width: int | None = None) -> Size:
        """``(height, width)`` in pixels of a sample (the UNet's sample size unless given)."""
        default = self._unet.config.sample_size * self.vae_scale_factor
        return (height or default, width or default)

    def add_time_ids(self, batch_size: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """``[B, 6]`` for this policy's size settings at the given image size."""
        size = self.image_size(height, width)
        return add_time_ids(self.original_size or size, self.crops_coords_top_left, self.target_size or size,
                            batch_size, self.device)

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | str | None = None,
                       guidance: bool = True, *, height: int | None = None,
                       width: int | None = None) -> SDXLConditioning:
        """Both encoders' states for ``prompts`` and, with guidance, for the negative prompts; without negative
        prompts the unconditional states are zeros when the model sets ``force_zeros_for_empty_prompt``
        (SDXL base does), else those of the empty prompt — diffusers' ``encode_prompt`` rules."""
        with torch.no_grad(), self.autocast():
            pos, neg, pooled, neg_pooled = self.pipeline.encode_prompt(
                prompt=list(prompts), device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=guidance, negative_prompt=per_prompt_negatives(prompts, negative_prompts))
        ids = self.add_time_ids(len(prompts), height, width)
        if not guidance:
            return SDXLConditioning(pos, None, pooled, None, ids)
        return SDXLConditioning(pos, neg, pooled, neg_pooled, ids)

    def predict(self, x: torch.Tensor, t: torch.Tensor, conditioning: SDXLConditioning | None,
                guidance_scale: float, *, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """UNet output at ``x_t`` (float32), with classifier-free guidance when negative states are present;
        ``params`` replace trainable weights for this call (see :meth:`reference_params`)."""
        if not isinstance(conditioning, SDXLConditioning):
            raise TypeError(f"Stable Diffusion XL needs SDXLConditioning (text states, pooled embeddings and "
                            f"add_time_ids), got {type(conditioning).__name__}; build it with encode_prompts, and "
                            "drop guidance with conditioning.without_guidance() rather than a new TextConditioning.")
        c = conditioning
        guided = c.negative_prompt_embeds is not None and guidance_scale > 1.0
        dtype = precision.module_dtype(self._unet)  # inputs follow the weights when not autocasting
        if guided:
            x, t = torch.cat([x, x]), torch.cat([t, t])
            states = torch.cat([c.negative_prompt_embeds, c.prompt_embeds])
            pooled = torch.cat([c.negative_pooled_prompt_embeds, c.pooled_prompt_embeds])
            ids = torch.cat([c.add_time_ids, c.add_time_ids])
        else:
            states, pooled, ids = c.prompt_embeds, c.pooled_prompt_embeds, c.add_time_ids
        added = {"text_embeds": pooled.to(dtype), "time_ids": ids.to(dtype)}
        with self.autocast():
            out = self._network(params)(x.to(dtype), t, encoder_hidden_states=states.to(dtype), added_cond_kwargs=added).sample
        out = out.float()
        if not guided:
            return out
        uncond, cond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in ``[0, 1]`` (float32, ``[B, 3, H, W]``); a ``force_upcast`` VAE decodes in float32."""
        vae = self.pipeline.vae
        config = vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean, device=latents.device).view(1, -1, 1, 1)
            std = torch.tensor(config.latents_std, device=latents.device).view(1, -1, 1, 1)
            z = latents * std / config.scaling_factor + mean
        else:
            z = latents / config.scaling_factor
        ctx = torch.autocast(self.device.type, enabled=False) if self._vae_upcast else self.autocast()
        with ctx:
            images = vae.decode(z.to(precision.module_dtype(vae))).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ----------------------------------------------------------------- policy interface
    def sample(self, prompts: Sequence[str] | None = None, *, negative_prompts: Sequence[str] | str | None = None,
               conditioning: SDXLConditioning | None = None, guidance_scale: float = 5.0, height: int | None = None,
               width: int | None = None, **kwargs) -> SampleResult:
        """As :meth:`StableDiffusionPolicy.sample`; ``add_time_ids`` follow ``height``/``width`` unless the policy
        fixes ``original_size``/``target_size``."""
        if conditioning is None and prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            conditioning = self.encode_prompts(prompts, negative_prompts, guidance=guidance_scale > 1.0,
                                               height=height, width=width)
        return super().sample(prompts, conditioning=conditioning, guidance_scale=guidance_scale, height=height,
                              width=width, **kwargs)

    # ----------------------------------------------------------------- saving
    def _model_info_extra(self) -> dict[str, Any]:
        """The VAE and the size conditioning, so that a saved SDXL result continues with them."""
        return {**super()._model_info_extra(), "sdxl": {"original_size": self.original_size,
                "crops_coords_top_left": self.crops_coords_top_left, "target_size": self.target_size}}


def _check_added_conditioning(pipeline: StableDiffusionXLPipeline) -> None:
    """The UNet must take ``text_time`` added conditioning of width ``6 * addition_time_embed_dim + P``."""
    config = pipeline.unet.config
    if config.addition_embed_type != "text_time":
        raise ValueError(f"the UNet has addition_embed_type={config.addition_embed_type!r}, not 'text_time': this is "
                         "not an SDXL base model; load it with StableDiffusionPolicy instead.")
    if pipeline.text_encoder_2 is None:
        raise ValueError("this SDXL pipeline has no text_encoder_2 (a refiner?); diffrl trains SDXL base models.")
    pooled = pipeline.text_encoder_2.config.projection_dim
    expected = 6 * config.addition_time_embed_dim + pooled
    if config.projection_class_embeddings_input_dim != expected:
        raise ValueError(f"the UNet's projection_class_embeddings_input_dim={config.projection_class_embeddings_input_dim}"
                         f" does not match 6 * addition_time_embed_dim ({config.addition_time_embed_dim}) + "
                         f"text_encoder_2.projection_dim ({pooled}) = {expected}; the text encoders do not fit it.")
