"""The lifecycle every diffrl trainer shares, so that a trainer is only its epoch body.

:class:`Trainer` owns the accelerator, the run folder and its records, resume, periodic evaluation, the divergence
guard, checkpoints, metrics, and ``save_pretrained``/``push_to_hub``. A trainer subclass supplies
:meth:`Trainer.run_epoch` (sample -> score -> advantages/weights -> updates, readable top to bottom in its own
file) and, where it needs them, :meth:`Trainer.prepare`, :meth:`Trainer.trainer_state` /
:meth:`Trainer.load_trainer_state` (JSON state) and :meth:`Trainer.checkpoint_files` /
:meth:`Trainer.load_checkpoint_files` (extra files inside each checkpoint's atomic commit).

TRL's trainers fixed here, for every trainer: saving works with the defaults, the image hook never indexes a
missing tracker, resume continues exactly (epoch, step, optimizer, schedule, statistics, RNG), saving cannot
deadlock several processes, and a diverging run stops instead of saving NaN.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, NamedTuple

import torch
from PIL import Image
from accelerate.utils import DistributedType

from diffrl import checkpoint as ckpt
from diffrl.build import apply_gradient_checkpointing
from diffrl.config import SharedConfig, diff_for_resume, load_config
from diffrl.config.accelerate_settings import resolve_mixed_precision
from diffrl.pipelines.types import DiffusionPolicy
from diffrl.recipes.accelerator import choose_run_name, make_accelerator, process_state, seed_processes
from diffrl.recipes.checkpoints import CheckpointIO, full_trainable_state_dict, is_sharded, whole_parameters
from diffrl.recipes.evaluation import PeriodicEvaluator
from diffrl.recipes.guard import DivergenceGuard
from diffrl.recipes.optim import (apply_optimizer_settings, build_lr_scheduler, build_optimizer, clip_gradients,
                                  optimizer_step)
from diffrl.recipes.records import ImageFolderTracker, MetricsLogger, last_batch_images, write_config_record
from diffrl.recipes.results import model_card, push_result, sample_grid, save_result
from diffrl.run_folder import CONFIG_FILE
from diffrl.seeding import sample_on_seeds


class EpochResult(NamedTuple):
    """What :meth:`Trainer.run_epoch` returns: the global step after the epoch, its metrics (namespaced), and how
    many reward evaluations it made (all processes together)."""

    global_step: int
    metrics: dict[str, float]
    reward_queries: int


def resolve_policy(sd_pipeline: Any) -> DiffusionPolicy:
    """The diffrl policy behind a TRL-style pipeline object (or the policy itself)."""
    policy = getattr(sd_pipeline, "policy", sd_pipeline)
    if not isinstance(policy, DiffusionPolicy):
        raise TypeError(
            f"sd_pipeline of type {type(sd_pipeline).__name__} is not a diffrl policy. Pass "
            "DefaultDDPOStableDiffusionPipeline / DefaultDDPODDPMPipeline, or a diffrl policy "
            "(StableDiffusionPolicy, DDPMPolicy, ...).")
    return policy


def call_image_hook(hook: Callable | None, data: Any, global_step: int, accelerator) -> None:
    """TRL's hook contract: ``hook(data, global_step, tracker)`` with the first tracker, or — when the run has
    none — an :class:`~diffrl.recipes.records.ImageFolderTracker` saving PNGs under accelerate's project folder
    (the run folder unless ``project_kwargs`` names another). Without a hook
    but with a tracker, the last batch's images (captioned with prompt and reward) go to the tracker."""
    tracker = accelerator.trackers[0] if accelerator.trackers else None
    if hook is not None:
        folder = Path(accelerator.project_dir or ".") / "images"
        hook(data, global_step, tracker if tracker is not None else ImageFolderTracker(folder))
    elif tracker is not None and accelerator.is_main_process and hasattr(tracker, "log_images"):
        tracker.log_images(last_batch_images(data), step=global_step)


def peak_memory_metrics(device: torch.device) -> dict[str, float]:
    """``perf/peak_memory_mb``: the accelerator's peak allocated memory since the last reset (CUDA only;
    an empty dict elsewhere), then resets the peak so each epoch reports its own."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return {"perf/peak_memory_mb": peak}


def configure_deepspeed(accelerator, config: SharedConfig, accumulation_steps: int) -> None:
    """Under DeepSpeed, fill what its engine needs before ``prepare`` and diffrl's trainers cannot give it through
    a dataloader: ``train_micro_batch_size_per_gpu`` (``train_batch_size``), ``gradient_accumulation_steps`` (the
    trainer's micro-steps per optimizer step), ``train_batch_size`` and ``gradient_clipping``
    (``train_max_grad_norm``; DeepSpeed clips inside its step). A no-op otherwise."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if accelerator.distributed_type != DistributedType.DEEPSPEED or plugin is None:
        return
    ds = plugin.deepspeed_config
    micro = int(config.train_batch_size)
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = int(accumulation_steps)
    ds["train_batch_size"] = micro * int(accumulation_steps) * accelerator.num_processes
    if math.isfinite(config.train_max_grad_norm):
        ds["gradient_clipping"] = float(config.train_max_grad_norm)
    else:
        ds.pop("gradient_clipping", None)


class Timer:
    """Seconds between calls of :meth:`lap`."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed


class Trainer:
    """``Trainer(config, reward_function, prompt_function, sd_pipeline, image_samples_hook=None)``, TRL's signature.

    ``sd_pipeline`` is a TRL-style pipeline (:class:`~diffrl.DefaultDDPOStableDiffusionPipeline`, ...) or a diffrl
    policy. Metrics: ``perf/wall_s`` is the cumulative time spent in epochs (evaluation and checkpoints excluded)
    and ``perf/reward_queries`` the cumulative number of reward evaluations, both continued across a resume.
    """

    trainer_name: ClassVar[str] = "diffrl"
    config_class: ClassVar[type] = SharedConfig

    def __init__(self, config: SharedConfig, reward_function: Callable, prompt_function: Callable, sd_pipeline: Any,
                 image_samples_hook: Callable | None = None) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}.")
        self.config = config
        self.reward_fn, self.prompt_fn, self.image_samples_callback = reward_function, prompt_function, image_samples_hook
        self.sd_pipeline = sd_pipeline
        self.check_inputs()
        processes = process_state()
        config.validate(num_processes=processes.num_processes)
        self.precision = resolve_mixed_precision(config.mixed_precision)
        self.policy = resolve_policy(sd_pipeline)
        apply_gradient_checkpointing(self.policy, config)  # also for policies built outside diffrl train
        resume = ckpt.find_latest(config.resume_from) if config.resume_from else None
        self.run_name = choose_run_name(config, processes.num_processes, resume)
        self.run_dir = Path(config.logdir) / self.run_name
        self.checkpoints_dir = ckpt.checkpoint_dir(config.logdir, self.run_name)
        record = dataclasses.replace(config, mixed_precision=self.precision.value)  # the precision in force
        resume_state = ckpt.read_state(resume) if resume is not None else None
        changed = self._resume_changes(record, resume_state) if resume is not None else {}
        self.accelerator = acc = make_accelerator(config, self.precision.value, self.run_dir)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for folder in (self.run_dir, self.checkpoints_dir):
                ckpt.remove_stale_temporaries(folder)
            write_config_record(self.run_dir, record.to_yaml(),
                                None if resume_state is None else int(resume_state["epoch"]))
        acc.wait_for_everyone()
        seed_processes(config.seed)
        self.policy.to(acc.device, self.precision.value)
        if config.log_with:
            acc.init_trackers(config.tracker_project_name, config=config.to_flat_dict(), init_kwargs=config.tracker_kwargs)
        self.metrics = MetricsLogger(acc, self.run_dir)
        self.guard = DivergenceGuard(self.checkpoints_dir)
        self._params = list(self.policy.trainable_parameters())
        optimizer = build_optimizer(config, self._params)
        self.lr_scheduler = build_lr_scheduler(config, optimizer, self.total_optimizer_steps())
        self._prepared_module: torch.nn.Module | None = None  # what accelerate prepared of the trained module
        configure_deepspeed(acc, config, self.deepspeed_accumulation_steps())
        self.optimizer = self.prepare(optimizer)
        # Sharding (FSDP2) replaces the parameters in place: clip and check the ones training really updates.
        self._params = list(self.policy.trainable_parameters())
        self.checkpoint_io = CheckpointIO(acc, self.policy, self.lr_scheduler, self._prepared_module)
        self.evaluator = PeriodicEvaluator(config, self.policy, reward_function, prompt_function, self.run_dir, acc)
        self.first_epoch, self.global_step, self.last_metrics = 0, 0, {}
        self.wall_s, self.reward_queries = 0.0, 0
        if resume is not None:
            self._resume(resume, changed)

    # ------------------------------------------------------------------ what a trainer supplies
    def check_inputs(self) -> None:
        """Refuse unusable inputs before any work (e.g. a non-differentiable reward for reward backpropagation)."""

    def total_optimizer_steps(self) -> int:
        """Optimizer steps of the whole run (the learning-rate schedule's length)."""
        return self.config.num_epochs

    def prepare(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Hand the trained module and the optimizer to accelerate (DDP, mixed precision); returns the optimizer."""
        module, optimizer = self.accelerator.prepare(self.policy.trainable_module, optimizer)
        self._prepared_module = module
        self.policy.use_forward_module(module)
        return optimizer

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """``accelerator.backward(loss)`` where ``sync`` says whether this micro-step ends an accumulation (the
        optimizer steps after it). Under DeepSpeed, whose engine steps inside ``backward``, ``sync`` becomes its
        accumulation boundary and the loss (already divided by the trainer) is not divided again."""
        acc = self.accelerator
        if acc.distributed_type == DistributedType.DEEPSPEED:
            acc.gradient_state._set_sync_gradients(sync)
            acc.backward(loss, scale_wrt_gas=False)
        else:
            acc.backward(loss)

    def deepspeed_accumulation_steps(self) -> int:
        """Micro-steps per optimizer step, for DeepSpeed's config (``gradient_accumulation_steps``)."""
        return self.config.train_gradient_accumulation_steps

    def run_epoch(self, epoch: int, global_step: int) -> EpochResult:
        raise NotImplementedError

    def trainer_state(self) -> dict[str, Any]:
        """The trainer's own JSON state saved in every checkpoint (e.g. per-prompt statistics)."""
        return {}

    def load_trainer_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`trainer_state` from a checkpoint's state."""

    def checkpoint_files(self, folder: Path) -> None:
        """Write extra files into a checkpoint being saved (its hidden folder, before the marker and the rename,
        so they are part of the atomic commit); called on every process, which decides who writes."""

    def load_checkpoint_files(self, folder: Path) -> None:
        """Read what :meth:`checkpoint_files` wrote, on resume (after the state was restored)."""

    # ------------------------------------------------------------------ what every trainer's update does
    def optimizer_update(self, epoch: int, global_step: int, stats: dict[str, list[torch.Tensor]]) -> int:
        """Clip the gradients (recording ``stats/grad_norm``), stop if they are not finite (the divergence
        guard: before the step, so the weights stay the last finite ones), step the optimizer and the schedule;
        returns the new global step. One host synchronisation, here, per optimizer step."""
        norm = clip_gradients(self.accelerator, self._params, self.config.train_max_grad_norm)
        self.guard.check_gradients(norm, epoch, global_step, self.lr_scheduler.get_last_lr()[0])
        stats.setdefault("stats/grad_norm", []).append(norm.detach())
        optimizer_step(self.optimizer, self.lr_scheduler)
        return global_step + 1

    # ------------------------------------------------------------------ the loop
    def train(self, epochs: int | None = None) -> None:
        """Train from the first (or resumed) epoch up to ``epochs`` (default ``config.num_epochs``)."""
        last = epochs if epochs is not None else self.config.num_epochs
        for epoch in range(self.first_epoch, last):
            self.global_step = self.step(epoch, self.global_step)
        self.first_epoch = max(self.first_epoch, last)
        if self.config.log_with:
            self.accelerator.end_training()

    def step(self, epoch: int, global_step: int) -> int:
        """One epoch, then evaluation, checkpoint and the metrics line (written after the checkpoint commits);
        returns the global step."""
        started = time.perf_counter()
        result = self.run_epoch(epoch, global_step)
        global_step = result.global_step
        self.wall_s += time.perf_counter() - started
        self.reward_queries += result.reward_queries
        metrics = {"epoch": epoch, **result.metrics, "train/lr": self.lr_scheduler.get_last_lr()[0],
                   **peak_memory_metrics(self.accelerator.device),
                   "perf/wall_s": self.wall_s, "perf/reward_queries": float(self.reward_queries)}
        metrics.update(self.evaluator.maybe_run(epoch))
        self.last_metrics = metrics
        if (epoch + 1) % self.config.save_freq == 0 or epoch + 1 == self.config.num_epochs:
            self.guard.check_weights(self._params, epoch, global_step, self.config.train_learning_rate)
            state = {"global_step": global_step, "metrics": metrics, "wall_s": self.wall_s,
                     "reward_queries": self.reward_queries, "evaluation": self.evaluator.state_dict(),
                     **self.trainer_state()}
            self.checkpoint_io.save(self.checkpoints_dir, epoch, self.config.num_checkpoint_limit, state,
                                    self.checkpoint_files)
        self.metrics.log(metrics, step=global_step)
        return global_step

    # ------------------------------------------------------------------ resume
    def _resume_changes(self, record: SharedConfig, resume_state: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """Settings that differ from the resumed run's newest config record; those that cannot change mid-run
        are refused (a ConfigError naming each, before any model moves), the others returned to be applied."""
        records = sorted(self.run_dir.glob("config.resume-*.yaml"), key=lambda p: int(p.stem.rpartition("-")[2]))
        recorded_file = records[-1] if records else self.run_dir / CONFIG_FILE
        if not recorded_file.is_file():
            return {}
        diff = diff_for_resume(load_config(recorded_file), record)
        diff.raise_if_refused(f"checkpoint epoch {resume_state['epoch']}")
        return {c.field: (c.old, c.new) for c in diff.applied}

    def _resume(self, path: Path, changed: dict[str, tuple[Any, Any]]) -> None:
        state = self.checkpoint_io.load(path, self.optimizer)
        self.first_epoch, self.global_step = int(state["epoch"]) + 1, int(state["global_step"])
        self.wall_s, self.reward_queries = float(state.get("wall_s", 0.0)), int(state.get("reward_queries", 0))
        self.load_trainer_state(state)
        self.load_checkpoint_files(path)
        self.evaluator.load_state_dict(state.get("evaluation"))
        apply_optimizer_settings(self.optimizer, self.lr_scheduler, self.config, changed)
        dropped = self.metrics.truncate_after(int(state["epoch"]))
        self.metrics.restore(int(state["epoch"]), state.get("metrics"), self.global_step)
        note = f"; dropped {dropped} metrics line(s) of epochs after it" if dropped else ""
        changes = "".join(f"\n  {k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        self.accelerator.print(f"resumed from {path}: continuing at epoch {self.first_epoch}, global step "
                               f"{self.global_step}{note}" + (f"; settings changed:{changes}" if changes else ""))

    # ------------------------------------------------------------------ results
    def _whole_weights(self):
        """A context in which the policy's trained weights are whole tensors, for saving a result: under
        FSDP/DeepSpeed they are gathered (every process calls this) and, on the main process, stand in for the
        shards while the policy saves itself; unsharded, nothing changes."""
        if not is_sharded(self.accelerator):
            return contextlib.nullcontext()
        full = full_trainable_state_dict(self.accelerator, self.policy, self._prepared_module)
        return whole_parameters(self.policy.trainable_module, full)

    def _check_finite_weights(self) -> None:
        self.guard.check_weights(self._params, self.first_epoch, self.global_step, self.config.train_learning_rate)

    def card_samples(self, count: int = 8) -> Image.Image | None:
        """What the model now generates, for the model card: ``count`` images on fixed seeds (``eval_seed + i``)
        with the evaluation's prompts (or ``count`` fresh draws of the prompt function); main process only."""
        if not self.accelerator.is_main_process:
            return None
        c = self.config
        prompts = list(self.evaluator.prompts[:count]) or [self.prompt_fn()[0] for _ in range(count)]
        images = [batch.images.cpu() for batch in sample_on_seeds(
            self.policy, prompts, [c.eval_seed + i for i in range(len(prompts))],
            num_inference_steps=getattr(c, "eval_num_steps", None) or c.sample_num_steps,
            guidance_scale=c.sample_guidance_scale, eta=c.sample_eta, batch_size=count,
            height=c.sample_height, width=c.sample_width)]
        return sample_grid(torch.cat(images))

    def save_pretrained(self, save_directory: str) -> None:
        """Write the fine-tuned model (LoRA weights or a full pipeline), a grid of samples and a model card; all
        processes call it."""
        self._check_finite_weights()
        samples = self.card_samples()
        with self._whole_weights():
            save_result(self.accelerator, self.policy, self.config, self.last_metrics, self.trainer_name,
                        save_directory, samples=samples)

    def create_model_card(self, path: str | None = None, model_name: str | None = None,
                          dataset_name: str | None = None, tags: list[str] | None = None):
        """TRL's method: the model card of this run (written to ``<path>/README.md`` when ``path`` is given)."""
        card = model_card(self.config, self.last_metrics, self.trainer_name, self.policy.base_model,
                          dataset_name=dataset_name)
        if tags:
            card.data.tags = list(card.data.tags or []) + list(tags)
        if model_name:
            card.text = card.text.replace(card.text.splitlines()[0], f"# {model_name}", 1)
        if path is not None and self.accelerator.is_main_process:
            Path(path).mkdir(parents=True, exist_ok=True)
            card.save(Path(path) / "README.md")
        return card

    def push_to_hub(self, repo_id: str | None = None, commit_message: str | None = None, *,
                    private: bool | None = None, dataset_name: str | None = None, **_: Any) -> str | None:
        """Save to a temporary folder and upload it (token from ``HF_TOKEN`` or the login cache, never logged).

        ``repo_id`` defaults to ``config.hub_model_id``, then the run name."""
        self._check_finite_weights()
        repo = repo_id or getattr(self.config, "hub_model_id", None) or self.run_name
        private = private if private is not None else getattr(self.config, "hub_private", None)
        samples = self.card_samples()
        with self._whole_weights():
            return push_result(self.accelerator, self.policy, self.config, self.last_metrics, self.trainer_name,
                               repo, commit_message or f"diffrl {self.trainer_name} fine-tune", private,
                               samples=samples, dataset_name=dataset_name)

    def _save_pretrained(self, save_directory: str) -> None:  # TRL's private name, kept for old scripts
        self.save_pretrained(save_directory)

    save_model = save_pretrained
