"""The trainer every method shares: a :class:`Run`, a method's :class:`~diffrl.recipes.recipe.Recipe`, the epoch loop, checkpoints,
resume and results.

``Trainer(config, reward_function, prompt_function, sd_pipeline, image_samples_hook=None)`` is TRL's signature;
its construction reads top to bottom: let the recipe check its inputs, check the config, build the run, let the
recipe set itself up (its :class:`~diffrl.recipes.update.UpdateLoop` prepares the model), then resume. Each epoch
is ``recipe.run_epoch`` followed by evaluation, a checkpoint and the metrics line.

TRL's trainers fixed here, for every method: saving works with the defaults, the image hook never indexes a
missing tracker, resume continues exactly (epoch, step, optimizer, schedule, statistics, RNG), saving cannot
deadlock several processes, and a diverging run stops instead of saving NaN.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from accelerate.utils import broadcast_object_list
from PIL import Image

from diffrl.build import apply_gradient_checkpointing, check_policy_matches_config
from diffrl.config import SharedConfig
from diffrl.pipelines.types import DiffusionPolicy
from diffrl.prompts import PromptSource
from diffrl.recipes.accelerator import process_state
from diffrl.pipelines.sharded import is_fully_sharded
from diffrl.recipes.checkpoints import CheckpointIO, full_trainable_state_dict, is_sharded, whole_parameters
from diffrl.recipes.epoch import epoch_metrics
from diffrl.recipes.optim import apply_optimizer_settings
from diffrl.recipes.recipe import Recipe
from diffrl.recipes.results import model_card, push_result, sample_grid, save_result
from diffrl.recipes.run import Run
from diffrl.seeding import sample_on_seeds


def resolve_policy(sd_pipeline: Any) -> DiffusionPolicy:
    """The diffrl policy behind a TRL-style pipeline object (or the policy itself)."""
    policy = getattr(sd_pipeline, "policy", sd_pipeline)
    if not isinstance(policy, DiffusionPolicy):
        raise TypeError(
            f"sd_pipeline of type {type(sd_pipeline).__name__} is not a diffrl policy. Pass "
            "DefaultDDPOStableDiffusionPipeline / DefaultDDPODDPMPipeline, or a diffrl policy "
            "(StableDiffusionPolicy, DDPMPolicy, ...).")
    return policy


def peak_memory_metrics(device: torch.device) -> dict[str, float]:
    """``perf/peak_memory_mb``: the accelerator's peak allocated memory since the last reset (CUDA only;
    an empty dict elsewhere), then resets the peak so each epoch reports its own."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return {"perf/peak_memory_mb": peak}


def crossed_threshold(metrics: dict[str, float], below: dict, above: dict) -> str:
    """The first threshold ``metrics`` crossed (``stop_below``: fell below; ``stop_above``: rose above), as a
    sentence naming metric, value and setting; ``""`` when none (or the metric was not measured this epoch)."""
    for key, threshold in below.items():
        if key in metrics and metrics[key] < threshold:
            return f"{key}={metrics[key]:.4g} fell below {threshold:g} (stop_below)"
    for key, threshold in above.items():
        if key in metrics and metrics[key] > threshold:
            return f"{key}={metrics[key]:.4g} rose above {threshold:g} (stop_above)"
    return ""


class Trainer:
    """``Trainer(config, reward_function, prompt_function, sd_pipeline, image_samples_hook=None)``, TRL's signature.

    ``sd_pipeline`` is a TRL-style pipeline (:class:`~diffrl.DefaultDDPOStableDiffusionPipeline`, ...) or a diffrl
    policy. Metrics: those of :func:`~diffrl.recipes.epoch.epoch_metrics`, ``train/lr``, ``perf/wall_s`` (the
    cumulative time spent in epochs, evaluation and checkpoints excluded) and ``perf/reward_queries`` (the
    cumulative number of reward evaluations), both continued across a resume.
    """

    trainer_name: ClassVar[str] = "diffrl"
    config_class: ClassVar[type] = SharedConfig
    recipe_class: ClassVar[type]

    def __init__(self, config: SharedConfig, reward_function: Callable, prompt_function: Callable, sd_pipeline: Any,
                 image_samples_hook: Callable | None = None) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}.")
        policy = resolve_policy(sd_pipeline)
        self.config, self.sd_pipeline = config, sd_pipeline
        self.reward_fn, self.prompt_fn, self.image_samples_callback = reward_function, prompt_function, image_samples_hook
        self.recipe: Recipe = self.recipe_class(config, policy, reward_function, prompt_function)  # checks inputs
        config.validate(num_processes=process_state().num_processes)
        check_policy_matches_config(config, policy)
        apply_gradient_checkpointing(policy, config)  # also for policies built outside diffrl train
        self.run = Run(config, policy, reward_function, prompt_function, image_samples_hook)
        self.recipe.setup(self.run)
        update = self.recipe.update
        self.checkpoint_io = CheckpointIO(self.accelerator, policy, update.lr_scheduler, update.module,
                                          update.optimizer)
        self.first_epoch, self.global_step, self.last_metrics = 0, 0, {}
        self.wall_s, self.reward_queries = 0.0, 0
        if self.run.resume is not None:
            self._resume(self.run.resume, self.run.changed)

    # ------------------------------------------------------------------ what the run holds, by TRL's names
    @property
    def policy(self) -> DiffusionPolicy:
        return self.run.policy

    @property
    def accelerator(self):
        return self.run.accelerator

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.recipe.update.optimizer

    @property
    def lr_scheduler(self):
        return self.recipe.update.lr_scheduler

    @property
    def run_name(self) -> str:
        return self.run.run_name

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    @property
    def checkpoints_dir(self) -> Path:
        return self.run.checkpoints_dir

    # ------------------------------------------------------------------ the loop
    def train(self, epochs: int | None = None) -> None:
        """Train from the first (or resumed) epoch up to ``epochs`` (default ``config.num_epochs``)."""
        last = epochs if epochs is not None else self.config.num_epochs
        for epoch in range(self.first_epoch, last):
            self.global_step = self.step(epoch, self.global_step)
            self.stop_reason = self._stop_reason()
            if self.stop_reason:
                self.accelerator.print(f"stopped after epoch {epoch}: {self.stop_reason}")
                last = epoch + 1
                break
        self.first_epoch = max(self.first_epoch, last)
        if self.config.log_with:
            self.accelerator.end_training()

    stop_reason: str = ""
    """Why the last ``train`` call stopped before its last epoch (``stop_below`` / ``stop_above``), or ``""``."""

    def _stop_reason(self) -> str:
        """The main process's verdict on the epoch's evaluation (only it evaluates), on every process, so all of
        them stop together."""
        c = self.config
        if not (c.stop_below or c.stop_above):
            return ""
        reason = [crossed_threshold(self.last_metrics, c.stop_below, c.stop_above)]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(reason, from_process=0)
        return reason[0]

    def step(self, epoch: int, global_step: int) -> int:
        """One epoch, then evaluation, checkpoint and the metrics line (written after the checkpoint commits);
        returns the global step."""
        started = time.perf_counter()
        result = self.recipe.run_epoch(epoch, global_step)
        global_step = result.global_step
        self.wall_s += time.perf_counter() - started
        self.reward_queries += result.reward_queries
        metrics = {"epoch": epoch, **epoch_metrics(result, self.accelerator),
                   "train/lr": self.lr_scheduler.get_last_lr()[0], **peak_memory_metrics(self.accelerator.device),
                   "perf/wall_s": self.wall_s, "perf/reward_queries": float(self.reward_queries)}
        metrics.update(self.run.evaluator.maybe_run(epoch, global_step))
        self.last_metrics = metrics
        if (epoch + 1) % self.config.save_freq == 0 or epoch + 1 == self.config.num_epochs:
            self.run.guard.check_weights(self.recipe.update.params, epoch, global_step, self.config.train_learning_rate)
            self.checkpoint_io.save(self.checkpoints_dir, epoch, self.config.num_checkpoint_limit,
                                    self.checkpoint_state(global_step, metrics), self.recipe.save_files)
        self.run.metrics.log(metrics, step=global_step)
        return global_step

    def checkpoint_state(self, global_step: int, metrics: dict[str, float]) -> dict[str, Any]:
        """The one checkpoint dict (JSON; weights, optimizer, schedule and RNG are files beside it): the step, the
        epoch's metrics, the cumulative time and reward queries, the position in a built-in prompt source's stream, the
        evaluator's and the recipe's state."""
        return {"global_step": global_step, "metrics": metrics, "wall_s": self.wall_s,
                "reward_queries": self.reward_queries, "evaluation": self.run.evaluator.state_dict(),
                "prompts": self.prompt_fn.state_dict() if isinstance(self.prompt_fn, PromptSource) else None,
                "recipe": self.recipe.state_dict()}

    # ------------------------------------------------------------------ resume
    def _resume(self, path: Path, changed: dict[str, tuple[Any, Any]]) -> None:
        state = self.checkpoint_io.load(path, self.optimizer)
        self.first_epoch, self.global_step = int(state["epoch"]) + 1, int(state["global_step"])
        self.wall_s, self.reward_queries = float(state.get("wall_s", 0.0)), int(state.get("reward_queries", 0))
        self.recipe.load_state_dict(state.get("recipe", state))  # checkpoints before "recipe" kept it at the top
        self.recipe.load_files(path)
        self.run.evaluator.load_state_dict(state.get("evaluation"))
        if isinstance(self.prompt_fn, PromptSource) and state.get("prompts") is not None:
            self.prompt_fn.load_state_dict(state["prompts"])  # checkpoints before diffrl 0.1 restart the stream
        apply_optimizer_settings(self.optimizer, self.lr_scheduler, self.config, changed)
        metrics = self.run.metrics
        dropped = metrics.truncate_after(int(state["epoch"]))
        metrics.restore(int(state["epoch"]), state.get("metrics"), self.global_step)
        note = f"; dropped {dropped} metrics line(s) of epochs after it" if dropped else ""
        changes = "".join(f"\n  {k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        self.accelerator.print(f"resumed from {path}: continuing at epoch {self.first_epoch}, global step "
                               f"{self.global_step}{note}" + (f"; settings changed:{changes}" if changes else ""))

    # ------------------------------------------------------------------ results
    def _whole_weights(self):
        """A context in which the policy's trained weights are whole tensors, for saving a result: under
        FSDP2/DeepSpeed they are gathered (every process calls this) and, on the main process, stand in for the
        shards while the policy saves itself; unsharded, nothing changes."""
        if not is_sharded(self.accelerator) and not is_fully_sharded(self.policy.trainable_module):
            return contextlib.nullcontext()
        full = full_trainable_state_dict(self.accelerator, self.policy, self.recipe.update.module)
        return whole_parameters(self.policy.trainable_module, full)

    def _check_finite_weights(self) -> None:
        self.run.guard.check_weights(self.recipe.update.params, self.first_epoch, self.global_step,
                                     self.config.train_learning_rate)

    def card_samples(self, count: int = 8) -> Image.Image | None:
        """What the model now generates, for the model card: ``count`` images on fixed seeds (``eval_seed + i``)
        with the evaluation's prompts (or ``count`` fresh draws of the prompt function); the main process's image
        (a sharded model samples on every process, each forward pass being collective; the others get ``None``)."""
        sharded = is_fully_sharded(self.policy.trainable_module)
        if not self.accelerator.is_main_process and not sharded:
            return None
        c = self.config
        prompts = list(self.run.evaluator.prompts[:count])
        if not prompts:  # fresh draws, which leave a built-in source's position (saved in checkpoints) where it was
            position = self.prompt_fn.state_dict() if isinstance(self.prompt_fn, PromptSource) else None
            prompts = [self.prompt_fn()[0] for _ in range(count)]
            if position is not None:
                self.prompt_fn.load_state_dict(position)
        images = [batch.images.cpu() for batch in sample_on_seeds(
            self.policy, prompts, [c.eval_seed + i for i in range(len(prompts))],
            num_inference_steps=c.eval_num_steps or c.sample_num_steps,
            guidance_scale=c.sample_guidance_scale, eta=c.sample_eta, batch_size=count,
            height=c.sample_height, width=c.sample_width)]
        return sample_grid(torch.cat(images)) if self.accelerator.is_main_process else None

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
        repo = repo_id or self.config.hub_repo_id(self.run_name)
        private = private if private is not None else self.config.hub_private
        samples = self.card_samples()
        with self._whole_weights():
            return push_result(self.accelerator, self.policy, self.config, self.last_metrics, self.trainer_name,
                               repo, commit_message or f"diffrl {self.trainer_name} fine-tune", private,
                               samples=samples, dataset_name=dataset_name)

    def _save_pretrained(self, save_directory: str) -> None:  # TRL's private name, kept for old scripts
        self.save_pretrained(save_directory)

    save_model = save_pretrained
