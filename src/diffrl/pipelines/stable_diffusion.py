"""Stable Diffusion (UNet2DConditionModel + VAE + CLIP text encoder) as a policy."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from safetensors.torch import save_file

from diffrl.config import SharedConfig, Violation
from diffrl.config.shared import SIZE_FIELDS
from diffrl.pipelines import precision
from diffrl.pipelines.base import TrainableUNetPolicy
from diffrl.pipelines.chain import chain_options
from diffrl.pipelines.loading import load_vae
from diffrl.pipelines.lora import load_lora_state_dict, lora_state_dict, merged_unet
from diffrl.pipelines.saved import read_model_info
from diffrl.pipelines.single_file import sd1_checkpoint
from diffrl.pipelines.types import SampleResult, TextConditioning


class StableDiffusionPolicy(TrainableUNetPolicy):
    """A text-to-image latent diffusion model sampled with DDIM (``eta > 0``) as a Gaussian policy.

    Classifier-free guidance (Ho & Salimans 2022) when ``guidance_scale > 1``; trains LoRA adapters (PEFT)
    or the whole UNet. With ``mixed_precision`` "fp16"/"bf16" the frozen weights are stored in half precision
    and the forward passes autocast, while trainable weights, latents and log-probabilities stay float32.

    ``from_pretrained`` (:meth:`~diffrl.pipelines.base.TrainableUNetPolicy.from_pretrained`) loads a Hub id, a
    diffusers folder, a single-file checkpoint (``single_file_config``: the diffusers folder or Hub id describing
    its architecture, needed offline), or a result saved by diffrl; a diffrl LoRA result (a folder or Hub repo
    with ``diffrl_model.json``) loads its base model and then its adapter, ready to continue training, and
    ``lora_weights`` loads any diffusers-format LoRA the same way.
    """

    kind = "stable_diffusion"
    description = "a Stable Diffusion model"
    pipeline_class = StableDiffusionPipeline
    pipeline_class_names = frozenset({"StableDiffusionPipeline"})
    kohya_base_version = "sd_v1"
    load_options = ("single_file_config", "vae")
    is_conditional = True

    single_file_architecture = "stable-diffusion-v1"
    """``modelspec.architecture`` of the single-file export (the name A1111/ComfyUI-era tools read)."""

    def save_single_file(self, path: str | os.PathLike) -> None:
        """The model as one original-layout checkpoint (:mod:`diffrl.pipelines.single_file`) with any LoRA merged
        into the UNet: ``<Pipeline>.from_single_file`` loads it, as AUTOMATIC1111 and ComfyUI do."""
        unet = merged_unet(self._unet) if self.use_lora else self._unet
        state = self._single_file_state(unet)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path), metadata={"format": "pt", "modelspec.architecture": self.single_file_architecture,
                                              "modelspec.title": f"diffrl fine-tune of {self.base_model}"})

    def _single_file_state(self, unet: torch.nn.Module) -> dict[str, torch.Tensor]:
        """SD 1.x: UNet, VAE and the OpenAI CLIP text encoder (``cond_stage_model.transformer.*``)."""
        text = self.pipeline.text_encoder
        if getattr(text.config, "hidden_act", "quick_gelu") != "quick_gelu":
            raise ValueError("single-file export covers Stable Diffusion 1.x and SDXL; this model's text encoder is "
                             "OpenCLIP-H (SD 2.x), whose original layout is not written yet: export it as merged (a "
                             "diffusers folder) instead")
        return sd1_checkpoint(unet, self.pipeline.vae, text)

    def loaded_violations(self, config: SharedConfig) -> list[Violation]:
        """Sample sizes that are not a multiple of the VAE's factor (known once it is loaded)."""
        factor, violations = getattr(self, "vae_scale_factor", 8), []
        for name in SIZE_FIELDS:
            value = getattr(config, name)
            if value is not None and value % factor:
                violations.append(Violation(name, value, f"is not a multiple of {factor}, the VAE factor of the model",
                                            f"set {name}={max(factor, -(-value // factor) * factor)}"))
        return violations

    def configure(self, config: SharedConfig) -> None:
        """The run's VAE (``vae``), when it names one."""
        if config.vae is not None:
            self.replace_vae(config.vae)

    def replace_vae(self, source: str) -> None:
        """Swap the VAE for ``source`` (a folder, single file or Hub id; see
        :func:`~diffrl.pipelines.loading.load_vae`), placed on the policy's device and precision."""
        vae = load_vae(source).requires_grad_(False).eval()
        self.pipeline.vae = vae
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.vae_source = source  # recorded in a result's diffrl_model.json
        self.to(self.device, self.mixed_precision)

    def __init__(self, pipeline: StableDiffusionPipeline, *, vae_source: str | None = None, **settings: Any) -> None:
        """``vae_source``: where a replaced VAE came from (recorded in saved LoRA results, which load it again);
        ``settings``: as for :class:`~diffrl.pipelines.base.TrainableUNetPolicy` (``use_lora``, ``lora``,
        ``mixed_precision``, ``device``, ``base_model``, ``revision``)."""
        pipeline.safety_checker = None
        self.vae_source = vae_source
        self.vae_scale_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        super().__init__(pipeline, **settings)

    # ----------------------------------------------------------------- loading
    @classmethod
    def _split_options(cls, name_or_path: str | os.PathLike, revision: str,
                       options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``vae`` (a folder, single file or Hub id; see :func:`~diffrl.pipelines.loading.load_vae`) replaces the
        pipeline's VAE; unset, a saved LoRA result's recorded VAE is used (a full result saved its VAE)."""
        load_kwargs, init_kwargs = super()._split_options(name_or_path, revision, options)
        vae = load_kwargs.pop("vae", None)
        if vae is None:
            info = read_model_info(name_or_path, revision) or {}
            if info.get("kind") == cls.kind and info.get("lora"):
                # "sdxl": {"vae": ...} is where diffrl 0.x before this release recorded an SDXL result's VAE
                vae = info.get("vae") or info.get("sdxl", {}).get("vae")
        if vae is not None:
            load_kwargs["vae"] = load_vae(vae, revision)
            init_kwargs["vae_source"] = os.fspath(vae)
        return load_kwargs, init_kwargs

    def load_lora_weights(self, source: str | os.PathLike) -> None:
        """Load diffusers-format LoRA weights (``pytorch_lora_weights.safetensors``; the UNet part) into the
        trainable adapter."""
        state, _ = self.pipeline_class.lora_state_dict(os.fspath(source))
        unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
        if not unet_state:
            raise ValueError(f"'{source}' holds no UNet LoRA weights (keys: {list(state)[:3]}).")
        load_lora_state_dict(self._unet, convert_unet_state_dict_to_peft(unet_state), os.fspath(source))

    def _frozen_modules(self) -> list[torch.nn.Module]:
        return [self.pipeline.vae, self.pipeline.text_encoder]

    # ----------------------------------------------------------------- pieces
    @property
    def tokenizer(self):
        return self.pipeline.tokenizer

    def encode_prompts(self, prompts: Sequence[str], negative_prompts: Sequence[str] | str | None = None,
                       guidance: bool = True, *, height: int | None = None,
                       width: int | None = None) -> TextConditioning:
        """CLIP text states for ``prompts`` and, with guidance, for the negative prompts (empty if none).
        ``height``/``width`` are accepted for the interface's sake (SDXL's conditioning depends on them)."""
        negative_prompts = per_prompt_negatives(prompts, negative_prompts)
        with torch.no_grad(), self.autocast():
            pos, neg = self.pipeline.encode_prompt(list(prompts), self.device, 1, guidance, negative_prompts)
        return TextConditioning(pos, neg if guidance else None)

    def _latent_shape(self, batch_size: int, height: int | None, width: int | None) -> tuple[int, ...]:
        config = self._unet.config
        h = (height or config.sample_size * self.vae_scale_factor) // self.vae_scale_factor
        w = (width or config.sample_size * self.vae_scale_factor) // self.vae_scale_factor
        return (batch_size, config.in_channels, h, w)

    def predict(self, x: torch.Tensor, t: torch.Tensor, conditioning: TextConditioning | None,
                guidance_scale: float, *, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """UNet output at ``x_t`` (float32), with classifier-free guidance when negative states are present;
        ``params`` replace trainable weights for this call (see :meth:`reference_params`)."""
        if conditioning is None:
            raise ValueError("Stable Diffusion needs text conditioning; pass prompts (an empty string is allowed).")
        guided = conditioning.negative_prompt_embeds is not None and guidance_scale > 1.0
        dtype = precision.module_dtype(self._unet)  # inputs follow the weights outside autocast (a UNet in fp16)
        unet = self._network(params)
        with self.autocast():
            if guided:
                states = torch.cat([conditioning.negative_prompt_embeds, conditioning.prompt_embeds]).to(dtype)
                out = unet(torch.cat([x, x]).to(dtype), torch.cat([t, t]), encoder_hidden_states=states).sample
                uncond, cond = out.float().chunk(2)
                return uncond + guidance_scale * (cond - uncond)
            states = conditioning.prompt_embeds.to(dtype)
            return unet(x.to(dtype), t, encoder_hidden_states=states).sample.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in ``[0, 1]`` (float32, ``[B, 3, H, W]``)."""
        vae = self.pipeline.vae
        with self.autocast():
            images = vae.decode(latents.to(precision.module_dtype(vae)) / vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ----------------------------------------------------------------- policy interface
    def sample(self, prompts: Sequence[str] | None = None, *, batch_size: int | None = None,
               guidance_scale: float = 5.0, generator: torch.Generator | list[torch.Generator] | None = None,
               negative_prompts: Sequence[str] | str | None = None, conditioning: TextConditioning | None = None,
               latents: torch.Tensor | None = None, height: int | None = None, width: int | None = None,
               **options: Any) -> SampleResult:
        """Sample a batch: one image per prompt (``prompts`` or precomputed ``conditioning``).

        ``generator`` drives every random draw: the initial noise and the noise of each step. ``options``: the
        sampling options of :func:`diffrl.pipelines.chain.run_chain` (``num_inference_steps`` 50, ``eta`` 1.0,
        ``grad_steps``, ``gradient_checkpointing``, ``stop_after_step``, ``progress``, ``sde_steps``).
        """
        options = chain_options(options)
        if conditioning is None:
            if prompts is None:
                raise ValueError("Stable Diffusion sampling needs prompts (or precomputed conditioning).")
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            conditioning = self.encode_prompts(prompts, negative_prompts, guidance=guidance_scale > 1.0)
        batch = conditioning.prompt_embeds.shape[0]
        if batch_size is not None and batch_size != batch:
            raise ValueError(f"batch_size={batch_size} but {batch} prompts were given; pass one prompt per image.")
        prompts = list(prompts) if prompts is not None else [""] * batch
        return self._run(conditioning, prompts, batch, latents, generator, height, width,
                         guidance_scale=guidance_scale, **options)

    # ----------------------------------------------------------------- saving
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """LoRA: ``pytorch_lora_weights.safetensors`` (with the adapter's config, alpha included, in its metadata) for
        the diffusers pipeline's ``load_lora_weights``; full
        fine-tuning: a whole pipeline folder for its ``from_pretrained``. Both with ``diffrl_model.json`` (base
        model, LoRA settings and the kind's own settings) to continue training."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.use_lora:
            self._save_lora(directory)
        else:
            setattr(self.pipeline, self.denoiser_name, self._unet)
            self.pipeline.save_pretrained(directory, safe_serialization=True)
        self._write_model_info(directory)

    def _save_lora(self, directory: Path) -> None:
        """The adapter as ``pytorch_lora_weights.safetensors``, with its config (rank, alpha, targets) in the file's
        metadata, where diffusers' ``load_lora_weights`` reads it: without it diffusers assumes alpha = rank and
        loads any other alpha at the wrong scale."""
        layers = convert_state_dict_to_diffusers(lora_state_dict(self._unet))
        self.pipeline_class.save_lora_weights(directory, unet_lora_layers=layers, safe_serialization=True,
                                              unet_lora_adapter_metadata=self.lora.peft_config().to_dict())

    def _model_info_extra(self) -> dict[str, Any]:
        """The replaced VAE's source (``None``: the base model's), which a LoRA result loads again."""
        return {"vae": self.vae_source}


def per_prompt_negatives(prompts: Sequence[str], negative_prompts: Sequence[str] | str | None) -> list[str] | None:
    """``negative_prompts`` as one string per prompt (a single string is repeated; ``None`` stays ``None``)."""
    if isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts] * len(prompts)
    if negative_prompts is not None and len(negative_prompts) != len(prompts):
        raise ValueError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts; give one "
                         "per prompt or a single string for all.")
    return list(negative_prompts) if negative_prompts else None
