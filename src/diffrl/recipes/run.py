"""The run every recipe's epochs happen in, built once before any recipe sets itself up.

:class:`Run` holds the accelerator (processes, precision, trackers), the run folder and its records (the config
record, ``metrics.jsonl``), the divergence guard, the periodic evaluator and the resume point. It owns no
optimizer and no method: a recipe composes it with its own :class:`~diffrl.recipes.update.UpdateLoop`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from diffrl import checkpoint as ckpt
from diffrl import build
from diffrl.config import SharedConfig, diff_for_resume, load_config
from diffrl.config.accelerate_settings import resolve_mixed_precision
from diffrl.pipelines.types import DiffusionPolicy
from diffrl.prompts import PromptSource
from diffrl.recipes.accelerator import choose_run_name, make_accelerator, process_state, seed_processes
from diffrl.recipes.evaluation import PeriodicEvaluator
from diffrl.recipes.guard import DivergenceGuard
from diffrl.recipes.records import ImageFolderTracker, MetricsLogger, write_config_record
from diffrl.recipes.tracker_images import last_batch, log_captioned_images
from diffrl.run_folder import CONFIG_FILE


TRACKER_RUN_NAME = {"wandb": "name", "mlflow": "run_name", "swanlab": "experiment_name"}
"""The init keyword that names a run, per tracker (accelerate passes ``init_kwargs[tracker]`` to its constructor)."""


def tracker_init_kwargs(user: dict, run_name: str) -> dict:
    """``tracker_kwargs`` with each tracker's run named after the run folder, unless the user named it."""
    merged = {tracker: dict(kwargs) for tracker, kwargs in user.items()}
    for tracker, key in TRACKER_RUN_NAME.items():
        merged.setdefault(tracker, {}).setdefault(key, run_name)
    return merged


class Run:
    """The accelerator, run folder, records, guard, evaluator and resume point of one training run.

    Attributes:
        config, policy, reward_fn, prompt_fn, image_hook: what the trainer was given.
        accelerator: accelerate's ``Accelerator`` (the policy is on its device).
        run_name, run_dir, checkpoints_dir: the run folder ``<logdir>/<run_name>`` and its ``checkpoints/``.
        resume: the checkpoint folder to continue from, or ``None``; ``changed``: settings that differ from the
            resumed run's record and may change (``{field: (old, new)}``; the others were refused).
        metrics, guard, evaluator: ``metrics.jsonl``, the divergence guard, training-time evaluation.
    """

    def __init__(self, config: SharedConfig, policy: DiffusionPolicy, reward_fn: Callable, prompt_fn: Callable,
                 image_hook: Callable | None = None) -> None:
        processes = process_state()
        self.config, self.policy, self.reward_fn, self.prompt_fn = config, policy, reward_fn, prompt_fn
        self.image_hook = image_hook
        precision = resolve_mixed_precision(config.mixed_precision)
        self.resume = ckpt.find_latest(config.resume_from) if config.resume_from else None
        self.run_name = choose_run_name(config, processes.num_processes, self.resume)
        self.run_dir = Path(config.logdir) / self.run_name
        self.checkpoints_dir = ckpt.checkpoint_dir(config.logdir, self.run_name)
        # The record names what really runs: the precision in force, and the policy's model and LoRA settings
        # (a policy built by the caller, TRL-style, decides them), so checkpoints and reports rebuild it.
        record = dataclasses.replace(config, mixed_precision=precision.value, **build.policy_record(config, policy))
        resumed_epoch = int(ckpt.read_state(self.resume)["epoch"]) if self.resume is not None else None
        self.changed = self._resume_changes(record, resumed_epoch) if self.resume is not None else {}
        self.accelerator = acc = make_accelerator(config, precision.value, self.run_dir)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for folder in (self.run_dir, self.checkpoints_dir):
                ckpt.remove_stale_temporaries(folder)
            write_config_record(self.run_dir, record.to_yaml(), resumed_epoch)
        acc.wait_for_everyone()
        seed_processes(config.seed)
        policy.to(acc.device, precision.value)
        if config.log_with:
            acc.init_trackers(config.tracker_project_name, config=config.to_flat_dict(),
                              init_kwargs=tracker_init_kwargs(config.tracker_kwargs, self.run_name))
        self.metrics = MetricsLogger(acc, self.run_dir)
        self.guard = DivergenceGuard(self.checkpoints_dir)
        self.evaluator = PeriodicEvaluator(config, policy, reward_fn, build.build_eval_prompt_fn(config) or prompt_fn,
                                           self.run_dir, acc, log_images=self.log_images,
                                           heldout=build.build_eval_rewards(config))
        if isinstance(prompt_fn, PromptSource):  # each process its own share of the stream (after the evaluation's)
            prompt_fn.shard(acc.process_index, acc.num_processes)

    def _resume_changes(self, record: SharedConfig, epoch: int) -> dict[str, tuple[Any, Any]]:
        """Settings that differ from the resumed run's newest config record; those that cannot change mid-run
        are refused (a ConfigError naming each, before any model moves), the others returned to be applied."""
        records = sorted(self.run_dir.glob("config.resume-*.yaml"), key=lambda p: int(p.stem.rpartition("-")[2]))
        recorded_file = records[-1] if records else self.run_dir / CONFIG_FILE
        if not recorded_file.is_file():
            return {}
        diff = diff_for_resume(load_config(recorded_file, recorded=True), record)
        diff.raise_if_refused(f"checkpoint epoch {epoch}")
        return {c.field: (c.old, c.new) for c in diff.applied}

    def check_samples(self, tensors: dict[str, torch.Tensor], epoch: int, global_step: int) -> None:
        """The divergence guard on freshly sampled tensors (stops the run, naming them, if any is not finite)."""
        self.guard.check_samples(tensors, epoch, global_step, self.config.train_learning_rate)

    def show_images(self, data: Any, global_step: int) -> None:
        """TRL's hook contract: ``hook(data, global_step, tracker)`` with the first tracker, or — when the run has
        none — an :class:`~diffrl.recipes.records.ImageFolderTracker` saving PNGs under accelerate's project
        folder (the run folder unless ``project_kwargs`` names another). Without a hook but with trackers, the
        last batch's images go to them under ``samples/last_batch``, captioned with prompt and reward."""
        acc = self.accelerator
        tracker = acc.trackers[0] if acc.trackers else None
        if self.image_hook is not None:
            folder = Path(acc.project_dir or ".") / "images"
            self.image_hook(data, global_step, tracker if tracker is not None else ImageFolderTracker(folder))
        else:
            images, texts = last_batch(data)
            self.log_images("samples/last_batch", images, global_step, texts)

    def log_images(self, key: str, images: torch.Tensor, global_step: int, texts: list[str] | None = None) -> None:
        """``images [N, 3, H, W]`` in [0, 1] to every tracker that takes images, under ``key``, each captioned
        with ``texts`` where the tracker shows captions (main process only)."""
        if self.accelerator.is_main_process and self.accelerator.trackers:
            log_captioned_images(self.accelerator.trackers, key, images, texts or [""] * len(images), global_step)
