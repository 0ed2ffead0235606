"""What every policy shares: a trainable UNet (LoRA adapters or all weights), its device and precision, loading,
the forward pass with optional parameter overrides, the denoising chain and the recomputed step.

A policy subclass is a file of its own differences: the diffusers pipeline class, the latent shape, the UNet
call (:meth:`TrainableUNetPolicy.predict`), decoding, and the saved formats.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from diffrl.algorithms.truncation import GradientPlan
from diffrl.config import SharedConfig, Violation
from diffrl.config._types import suggest
from diffrl.config.sections import SIZE_FIELDS
from diffrl.pipelines import precision
from diffrl.pipelines.chain import run_chain
from diffrl.pipelines.loading import load_pipeline
from diffrl.pipelines.lora import LoraSettings, add_lora, kohya_state_dict, lora_state_dict, merged_unet
from diffrl.pipelines.saved import plan_load, write_model_info
from diffrl.pipelines.sharded import is_fully_sharded, local_slice, swapped_shards
from diffrl.pipelines.types import SampleResult, Trajectory
from diffrl.samplers import DenoisingSchedule, StepOutput

Params = Mapping[str, torch.Tensor]

# Names of LoRA's second factor: zero here switches an adapter off exactly (W x + B A x with B = 0).
_LORA_UP = ("lora_B.", "lora_embedding_B.")


class TrainableUNetPolicy:
    """Base of :class:`~diffrl.pipelines.StableDiffusionPolicy` and :class:`~diffrl.pipelines.DDPMPolicy`;
    implements :class:`~diffrl.pipelines.DiffusionPolicy`.

    :attr:`trainable_module` is the UNet itself; :attr:`unet` is what forward passes call, which
    :meth:`use_forward_module` may replace by a distributed wrapper. Subclasses set :attr:`kind` and
    :attr:`pipeline_class`, name the frozen modules that follow the UNet's device and precision, and implement
    ``predict``, ``decode``, ``_latent_shape``, ``load_lora_weights`` and ``save_pretrained``.
    """

    kind: ClassVar[str]
    """The ``kind`` recorded in ``diffrl_model.json`` ("stable_diffusion", "ddpm")."""
    pipeline_class: ClassVar[type]
    """The diffusers pipeline class the policy loads."""
    denoiser_name: ClassVar[str] = "unet"
    """The pipeline attribute holding the trained network ("unet"; "transformer" for the flow families)."""
    load_options: ClassVar[tuple[str, ...]] = ()
    """``from_pretrained`` keyword arguments that go to :func:`~diffrl.pipelines.loading.load_pipeline`; the
    other extra keywords go to ``__init__``."""
    is_conditional: ClassVar[bool]
    description: ClassVar[str] = "a diffusion model"
    """How errors name the family ("an SDXL model")."""
    pipeline_class_names: ClassVar[frozenset[str]] = frozenset()
    """The ``_class_name`` values of ``model_index.json`` that this family loads (:mod:`diffrl.pipelines.auto`)."""
    fixed_size: ClassVar[bool] = False
    """Whether the image size is fixed by the network (pixel DDPMs: no sample sizes, no VAE)."""
    load_time_options: ClassVar[tuple[str, ...]] = ()
    """Those of :attr:`model_options` that decide how the weights load (where, which modules): the run passes them
    to ``from_pretrained``; the others are applied by :meth:`configure`."""
    model_options: ClassVar[Mapping[str, str]] = {}
    """The family's own settings (``model_options.NAME`` of the config) -> what each sets; the family checks them
    (:meth:`option_violations`) and applies them (:meth:`configure`)."""

    pipeline: Any
    _unet: torch.nn.Module  # kept for callers of the old private name; use trainable_module

    def __init__(
        self,
        pipeline: Any,
        *,
        use_lora: bool = True,
        lora: LoraSettings | None = None,
        mixed_precision: str = "no",
        device: torch.device | str | None = None,
        base_model: str | None = None,
        revision: str = "main",
    ) -> None:
        """Wrap ``pipeline``: LoRA adapters on its UNet (``use_lora``, settings ``lora``) or all UNet weights
        trainable; frozen weights in ``mixed_precision`` ("no", "fp16", "bf16") on ``device``. ``base_model`` and
        ``revision`` are recorded in saved results. Subclasses take these keywords through ``**settings``."""
        self.pipeline = pipeline
        self.mixed_precision = mixed_precision
        self.use_lora = use_lora
        self.lora = (lora or LoraSettings()) if use_lora else None
        self.base_model = base_model
        self.revision = revision
        self.schedule = self._make_schedule(pipeline)
        self.num_train_timesteps = self.schedule.num_train_timesteps
        self._reference: dict[str, torch.Tensor] | None = None
        unet = getattr(pipeline, self.denoiser_name).eval()
        if use_lora:
            add_lora(unet, self.lora)
        else:
            unet.requires_grad_(True)
        self._unet = unet
        self.unet: torch.nn.Module = unet
        self.to(device or "cpu", mixed_precision)

    def _make_schedule(self, pipeline: Any) -> DenoisingSchedule:
        """The step math, from the pipeline's scheduler config (DDIM unless a subclass says otherwise)."""
        return DenoisingSchedule.from_scheduler_config(pipeline.scheduler.config)

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str = "main",
        use_lora: bool = True,
        lora: LoraSettings | None = None,
        lora_weights: str | os.PathLike | None = None,
        mixed_precision: str = "no",
        device: torch.device | str | None = None,
        **options: Any,
    ):
        """Load from a Hub id, a diffusers folder (or single file, where the pipeline supports it), or a result
        saved by diffrl: a LoRA result loads its base model first, then the adapter, ready to continue
        training; ``lora_weights`` loads an adapter the same way. ``options``: see the subclass."""
        _check_options(cls, options)
        plan = plan_load(name_or_path, revision, cls.kind, use_lora, lora, lora_weights)
        load_kwargs, init_kwargs = cls._split_options(name_or_path, revision, dict(options))
        pipeline = load_pipeline(cls.pipeline_class, plan.base, revision=plan.revision, **load_kwargs)
        policy = cls(pipeline, use_lora=plan.use_lora, lora=plan.lora, mixed_precision=mixed_precision, device=device,
                     base_model=plan.base, revision=plan.revision, **init_kwargs)
        if plan.lora_weights is not None:
            policy.load_lora_weights(plan.lora_weights)
        return policy

    @classmethod
    def _split_options(cls, name_or_path: str | os.PathLike, revision: str,
                       options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``from_pretrained``'s extra keywords as (those for ``load_pipeline``, those for ``__init__``)."""
        load_kwargs = {k: options.pop(k) for k in cls.load_options if k in options}
        return load_kwargs, options

    def load_lora_weights(self, source: str | os.PathLike) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------------- the family's run settings
    @classmethod
    def setting_violations(cls, config: SharedConfig, what: str) -> list[Violation]:
        """The settings of ``config`` this family cannot honour, known before any weights load (``what`` names the
        model in the messages): sample sizes or a VAE where the size is fixed, and ``model_options`` the family
        does not have or cannot take."""
        violations = []
        if cls.fixed_size:
            for name in SIZE_FIELDS:
                if getattr(config, name) is not None:
                    violations.append(Violation(name, getattr(config, name), f"cannot be set: {what}, whose image "
                                                "size is fixed by its UNet", f"remove {name} (null)"))
            if config.vae is not None:
                violations.append(Violation("vae", config.vae, f"cannot be set: {what}, which has no VAE",
                                            "remove vae (null)"))
        for name, value in config.model_options.items():
            if name not in cls.model_options:
                close = suggest(str(name), cls.model_options)
                takes = f"its options: {', '.join(cls.model_options)}" if cls.model_options else "it takes none"
                violations.append(Violation(f"model_options.{name}", value, f"is not an option of {what} ({takes})",
                                            f"did you mean {close!r}?" if close else "remove it"))
        known = {k: v for k, v in config.model_options.items() if k in cls.model_options}
        violations.extend(cls.option_violations(known))
        return violations

    @classmethod
    def option_violations(cls, options: Mapping[str, Any]) -> list[Violation]:
        """The values among ``options`` (the family's own, by name) that it cannot take; none here."""
        return []

    def loaded_violations(self, config: SharedConfig) -> list[Violation]:
        """Settings refused once the weights are loaded (e.g. a sample size the VAE cannot produce); none here."""
        return []

    def configure(self, config: SharedConfig) -> None:
        """Apply the run's family settings to the loaded policy (a VAE, size conditioning); none here."""

    # ----------------------------------------------------------------- saving
    def _write_model_info(self, directory: str | os.PathLike) -> None:
        """``diffrl_model.json`` beside the saved weights: what :meth:`from_pretrained` reads to continue."""
        write_model_info(directory, kind=self.kind, base_model=self.base_model, revision=self.revision,
                         lora=self.lora.to_dict() if self.lora else None, extra=self._model_info_extra())

    def save_merged(self, directory: str | os.PathLike) -> None:
        """The whole pipeline as a diffusers folder with any LoRA update merged into the weights: it loads with
        diffusers alone (``<Pipeline>.from_pretrained``; ComfyUI's diffusers loader), no PEFT and no diffrl."""
        original = getattr(self.pipeline, self.denoiser_name)
        setattr(self.pipeline, self.denoiser_name, merged_unet(self._unet) if self.use_lora else self._unet)
        try:
            self.pipeline.save_pretrained(directory, safe_serialization=True)
        finally:
            setattr(self.pipeline, self.denoiser_name, original)

    def save_single_file(self, path: str | os.PathLike) -> None:
        """The whole model (any LoRA merged in) as one original-layout ``.safetensors`` checkpoint, for
        AUTOMATIC1111, ComfyUI's checkpoint loader and diffusers' ``from_single_file``; families that have one say
        so (Stable Diffusion 1.x)."""
        raise ValueError(f"{self.description} has no single-file checkpoint export; export it as merged (a diffusers "
                         "folder) instead")

    kohya_base_version: ClassVar[str | None] = None
    """``ss_base_model_version`` of a kohya LoRA file of this family (None: the family has no such format)."""

    def save_kohya_lora(self, path: str | os.PathLike) -> None:
        """The LoRA adapter as one kohya-format ``.safetensors`` file (``lora_unet_..._to_q.lora_down.weight`` and
        ``.alpha`` keys, the layout AUTOMATIC1111, ComfyUI and diffusers' ``load_lora_weights`` read), with the
        adapter's real alpha (diffusers' converter writes the rank) and kohya's ``ss_*`` metadata."""
        if self.kohya_base_version is None:
            raise ValueError(f"{self.description} has no kohya LoRA format (it is for Stable Diffusion and SDXL "
                             "UNets); export as diffusers or merged")
        if not self.use_lora:
            raise ValueError("this result is a full fine-tune, not a LoRA; export it as merged (a whole pipeline "
                             "folder) instead")
        state = kohya_state_dict(lora_state_dict(self._unet), self.lora.alpha)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(self.lora.rank),
                    "ss_network_alpha": str(self.lora.alpha), "ss_base_model_version": self.kohya_base_version,
                    "ss_training_comment": "trained with diffrl"}
        save_file(state, str(path), metadata=metadata)

    def _model_info_extra(self) -> dict[str, Any] | None:
        """Kind-specific settings recorded in ``diffrl_model.json`` (none by default)."""
        return None

    # ----------------------------------------------------------------- modules, device, precision
    def _frozen_modules(self) -> list[torch.nn.Module]:
        """Modules besides the UNet that move and change precision with it (the VAE, the text encoder)."""
        return []

    def to(self, device: torch.device | str | None = None, mixed_precision: str | None = None):
        """Move to ``device`` and/or switch precision (frozen weights half, trainable weights float32)."""
        self.mixed_precision = mixed_precision or self.mixed_precision
        device = torch.device(device) if device is not None else self.device
        precision.place_policy_modules(self._frozen_modules(), self._unet, self.use_lora, device, self.mixed_precision)
        return self

    @property
    def device(self) -> torch.device:
        return next(self._unet.parameters()).device

    def autocast(self) -> contextlib.AbstractContextManager:
        return precision.autocast(self.device, self.mixed_precision)

    @property
    def trainable_module(self) -> torch.nn.Module:
        """The UNet itself (never a distributed wrapper): its trainable parameters are what is optimised and saved."""
        return self._unet

    def train(self, mode: bool = True) -> "TrainableUNetPolicy":
        """Put the trained module in training mode (dropout on), or back in evaluation mode with ``mode=False``."""
        self._unet.train(mode)
        return self

    def eval(self) -> "TrainableUNetPolicy":
        """Evaluation mode for the trained module (how every sample is drawn)."""
        return self.train(False)

    def use_forward_module(self, module: torch.nn.Module) -> None:
        """Make forward passes call ``module``: a wrapper of :attr:`trainable_module` such as accelerate's
        DistributedDataParallel (``policy.use_forward_module(accelerator.prepare(policy.trainable_module))``)."""
        self.unet = module

    # ----------------------------------------------------------------- trainable weights
    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        return (p for p in self._unet.parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached, contiguous CPU copies of the parameters that require grad, by their names in the UNet."""
        return {n: p.detach().to("cpu", copy=True).contiguous()
                for n, p in self._unet.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor], *, source: str | None = None) -> None:
        """Copy ``state`` (from :meth:`trainable_state_dict`) into the trainable parameters, keeping their device
        and dtype. The keys must be exactly the trainable parameters' names, else ``ValueError`` (naming
        ``source``, e.g. the checkpoint file, when given)."""
        params = {n: p for n, p in self._unet.named_parameters() if p.requires_grad}
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            mode = f"LoRA {self.lora.to_dict()}" if self.use_lora else "full fine-tuning"
            origin = f"the weights in {source}" if source else "these weights"
            raise ValueError(
                f"{origin} do not match this policy's trainable parameters ({mode}, base model "
                f"{self.base_model!r}): {len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:3]}). Build the policy with the same model, use_lora and LoRA settings "
                "(rank, target modules) as the run that saved them.")
        with torch.no_grad():
            for name, value in state.items():
                target = params[name]
                if tuple(value.shape) != tuple(target.shape):
                    where = f" in {source}" if source else ""
                    raise ValueError(f"weight {name!r}{where} has shape {tuple(value.shape)}, this policy's has "
                                     f"{tuple(target.shape)}; use the same model and LoRA rank as the saved run.")
                if hasattr(target, "to_local"):  # an FSDP2 shard: this process's slice of the whole tensor
                    target.to_local().copy_(local_slice(target, value))
                else:
                    target.copy_(value.to(target.device, target.dtype))

    def snapshot_reference(self, device: torch.device | str | None = None) -> None:
        """Full fine-tuning: keep a frozen copy of the current trainable weights (on ``device``, default the
        policy's; ``"cpu"`` saves accelerator memory at the cost of a copy per reference call) as the reference
        model of :meth:`reference_params`. Call it before the first update, and before loading a checkpoint
        when resuming. Not needed with LoRA (the base weights are the reference)."""
        if self.use_lora:
            return
        device = torch.device(device) if device is not None else self.device
        self._reference = {n: p.detach().to(device, copy=True)
                           for n, p in self._unet.named_parameters() if p.requires_grad}

    def reference_params(self) -> dict[str, torch.Tensor]:
        """``params`` under which :meth:`predict` is the frozen model before fine-tuning, without gradients.

        LoRA: every adapter's up-projection ``B`` is replaced by zeros (a stride-0 view: no memory), so each
        adapted layer computes exactly ``W x``; the other adapter weights are detached views. Full fine-tuning:
        the copy taken by :meth:`snapshot_reference` (an error when none was taken).
        """
        if self.use_lora:
            ref = {}
            for name, p in self._unet.named_parameters():
                if p.requires_grad:
                    up = any(tag in name for tag in _LORA_UP)
                    ref[name] = p.new_zeros(()).expand(p.shape) if up else p.detach()
            return ref
        if self._reference is None:
            raise RuntimeError("reference_params() of a fully fine-tuned policy needs a frozen copy of the initial "
                               "weights: call policy.snapshot_reference() (optionally device='cpu') once before "
                               "training.")
        device = self.device
        return {n: v.to(device, non_blocking=True) for n, v in self._reference.items()}

    def _network(self, params: Params | None) -> Callable[..., Any]:
        """The UNet call of one forward pass: :attr:`unet`, or the unwrapped UNet with ``params`` substituted
        (``torch.func.functional_call``; gradients then flow into ``params``, not the module's own weights, and
        no distributed wrapper syncs them: the old and reference policies are not trained)."""
        if params is None:
            return self.unet
        if is_fully_sharded(self._unet):  # FSDP2 shards: swap the override's shards in for the call (no gradients)

            def sharded_call(*args: Any, **kwargs: Any) -> Any:
                with swapped_shards(self._unet, params):
                    return self._unet(*args, **kwargs)

            return sharded_call

        def call(*args: Any, **kwargs: Any) -> Any:
            return torch.func.functional_call(self._unet, dict(params), args, kwargs, strict=False)

        return call

    # ----------------------------------------------------------------- model outputs
    def predict(self, x: torch.Tensor, t: torch.Tensor, conditioning: Any, guidance_scale: float, *,
                params: Params | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _predict(self, x, t, conditioning, guidance_scale, params: Params | None) -> torch.Tensor:
        # Subclasses written against the older ``predict(x, t, conditioning, guidance_scale)`` keep working
        # as long as no ``params`` are asked of them.
        if params is None:
            return self.predict(x, t, conditioning, guidance_scale)
        return self.predict(x, t, conditioning, guidance_scale, params=params)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, conditioning: Any, guidance_scale: float = 1.0, *,
                   params: Params | None = None) -> torch.Tensor:
        """``[B, C, h, w]`` the model's estimate of ``x_0`` at ``x_t`` (float32, differentiable), for epsilon-,
        v- and sample-prediction models alike (see :meth:`DenoisingSchedule.x0_from_output`)."""
        out = self._predict(x_t, t, conditioning, guidance_scale, params)
        return self.schedule.x0_from_output(out, x_t.float(), t)

    def noise_to(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (Ho et al. 2020, eq. 4) for ``[B]`` timesteps ``t``."""
        return self.schedule.add_noise(x0, noise, t)

    def step_log_prob(self, latents: torch.Tensor, timesteps: torch.Tensor, prev_timesteps: torch.Tensor,
                      next_latents: torch.Tensor, conditioning: Any = None, *, eta: float = 1.0,
                      guidance_scale: float = 5.0, params: Params | None = None) -> StepOutput:
        """Recompute the transition ``latents -> next_latents`` under the current weights (or ``params``), with
        gradients. ``guidance_scale`` is ignored by unconditional models."""
        out = self._predict(latents, timesteps, conditioning, guidance_scale, params)
        return self.schedule.step(out, latents, timesteps, prev_timesteps, eta=eta, prev_sample=next_latents)

    # ----------------------------------------------------------------- sampling
    def _latent_shape(self, batch_size: int, height: int | None, width: int | None) -> tuple[int, ...]:
        raise NotImplementedError

    def initial_noise(self, batch_size: int, generator=None, height: int | None = None,
                      width: int | None = None) -> torch.Tensor:
        """``x_T``: float32 Gaussian noise of the latent shape, scaled by the scheduler's ``init_noise_sigma``."""
        shape = self._latent_shape(batch_size, height, width)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        return noise * self.schedule.init_noise_sigma

    def _run(self, conditioning: Any, prompts: list[str], batch: int, latents: torch.Tensor | None,
             generator, height: int | None = None, width: int | None = None, **chain: Any) -> SampleResult:
        """The tail of every ``sample``: ``x_T`` (given or drawn), then :func:`~diffrl.pipelines.chain.run_chain`."""
        x_T = (latents.to(self.device, torch.float32) if latents is not None
               else self.initial_noise(batch, generator, height, width))
        return run_chain(self, x_T, conditioning, prompts, generator=generator, **chain)

    def sample(self, prompts: Sequence[str] | None = None, **kwargs: Any) -> SampleResult:
        raise NotImplementedError

    def sample_for_plan(self, prompts: Sequence[str] | None, plan: GradientPlan, *,
                        gradient_checkpointing: bool = False, **sample_kwargs: Any) -> torch.Tensor:
        """Differentiable images ``[B', 3, H, W]`` in ``[0, 1]`` for a reward-backpropagation ``plan``.

        ``grad_steps`` / ``stop_after_step`` plans run :meth:`sample` with them (``B' = B``). A DRaFT-LV plan
        (``renoise_draws = n``; Clark et al. 2023, Algorithm 2) samples the chain without gradients, then
        re-noises its ``x_0`` to the last step's timestep ``n`` times, ``x_t = sqrt(abar_t) x_0 +
        sqrt(1 - abar_t) eps`` with fresh ``eps`` from ``generator``, and denoises each with that one sampler
        step, whose UNet call carries gradients: ``B' = n B`` images, draw-major (repeat the prompts ``n``
        times to score them). ``sample_kwargs`` go to :meth:`sample` (``generator``, ``eta``, ...).
        """
        if not plan.renoise_draws:
            result = self.sample(prompts, grad_steps=plan.grad_steps, stop_after_step=plan.stop_after_step,
                                 gradient_checkpointing=gradient_checkpointing, **sample_kwargs)
            return result.images_with_grad
        with torch.no_grad():
            trajectory = self.sample(prompts, **sample_kwargs).trajectory
        own = inspect.signature(self.sample).parameters.get("guidance_scale")  # unconditional models have none
        guidance_scale = sample_kwargs.get("guidance_scale", 1.0 if own is None else own.default)
        eta = sample_kwargs.get("eta", inspect.signature(run_chain).parameters["eta"].default)
        return self._renoised_last_step(trajectory, plan.renoise_draws, sample_kwargs.get("generator"),
                                        guidance_scale=guidance_scale, eta=eta,
                                        gradient_checkpointing=gradient_checkpointing)

    def _renoised_last_step(self, trajectory: Trajectory, draws: int, generator, *, guidance_scale: float,
                            eta: float, gradient_checkpointing: bool) -> torch.Tensor:
        x0 = trajectory.latents[:, -1]  # [B, C, h, w], no graph (the chain ran without gradients)
        batch = x0.shape[0]
        if isinstance(generator, (list, tuple)):  # one generator per sample, reused by each copy of it
            generator = list(generator) * draws
            eps = torch.cat([randn_tensor(x0.shape, generator=generator[:batch], device=x0.device, dtype=x0.dtype)
                             for _ in range(draws)])
        else:
            eps = randn_tensor((draws * batch, *x0.shape[1:]), generator=generator, device=x0.device, dtype=x0.dtype)
        x0 = x0.repeat(draws, *([1] * (x0.ndim - 1)))
        t = trajectory.timesteps[:, -1].repeat(draws)
        t_prev = trajectory.prev_timesteps[:, -1].repeat(draws)
        x_t = self.noise_to(x0, eps, t)
        cond = trajectory.conditioning
        if cond is not None:
            cond = cond.index(torch.arange(batch, device=cond.prompt_embeds.device).repeat(draws))
        args = (x_t, t, cond, guidance_scale)
        out = checkpoint(self.predict, *args, use_reentrant=False) if gradient_checkpointing else self.predict(*args)
        step = self.schedule.step(out, x_t, t, t_prev, eta=eta, generator=generator, compute_log_prob=False)
        return self.decode(step.prev_sample)


def _check_options(cls: type, options: Mapping[str, Any]) -> None:
    """``TypeError`` for a ``from_pretrained`` keyword that neither the loader (``cls.load_options``) nor a
    subclass's ``__init__`` takes (the base settings are ``from_pretrained``'s own), raised before any loading."""
    accepted = set(cls.load_options)
    for klass in cls.__mro__:
        if klass is TrainableUNetPolicy:
            break
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters.values()
        accepted |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    unknown = sorted(set(options) - accepted - {"self", "pipeline"})
    if unknown:
        raise TypeError(f"{cls.__name__}.from_pretrained() got unexpected keyword argument(s) {unknown}; besides "
                        f"its own settings it takes: {sorted(accepted - {'self', 'pipeline'})}.")
