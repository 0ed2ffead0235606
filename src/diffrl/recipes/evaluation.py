"""Training-time evaluation on fixed seeds (``eval_every``), with keep-best.

Image ``i`` of every evaluation is sampled from seed ``eval_seed + i`` by the one fixed-seed rule of
:mod:`diffrl.seeding`, which ``diffrl sample`` and ``diffrl evaluate`` use too: the numbers a run logs as
``eval/...`` are those ``diffrl evaluate --seeds eval_seed ... eval_seed+n-1`` computes for the same model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from diffrl.metrics import diversity, image_statistics
from diffrl.pipelines.sharded import is_fully_sharded
from diffrl.pipelines.types import DiffusionPolicy
from diffrl.recipes.epoch import component_means
from diffrl.recipes.tracker_images import captions
from diffrl.rewards import score
from diffrl.seeding import sample_on_seeds


class EvalResult(NamedTuple):
    """``images``: ``[n, 3, H, W]`` in ``[0, 1]`` (CPU); ``rewards``: ``[n]``; ``metadata``: the reward's, per batch;
    ``prompt_metadata``: each prompt's (what the reward was given)."""

    images: torch.Tensor
    rewards: torch.Tensor
    prompts: list[str]
    metadata: list[Any]
    prompt_metadata: list[dict]

    @property
    def reward_mean(self) -> float:
        return float(self.rewards.mean())


def evaluate(policy: DiffusionPolicy, reward_fn: Callable, prompts: Sequence[str], *, seed: int,
             num_inference_steps: int, guidance_scale: float, eta: float, batch_size: int = 64,
             progress: str | None = "evaluating", height: int | None = None,
             width: int | None = None, prompt_metadata: Sequence[dict] | None = None) -> EvalResult:
    """Sample image ``i`` for ``prompts[i]`` from seed ``seed + i`` and score it with ``prompt_metadata[i]`` (default
    ``{}``), with a progress bar; ``height``/``width`` in pixels (``None``: the model's native size)."""
    prompts = list(prompts)
    given = [dict(m) for m in prompt_metadata] if prompt_metadata is not None else [{} for _ in prompts]
    if len(given) != len(prompts):
        raise ValueError(f"evaluate: {len(given)} prompt_metadata for {len(prompts)} prompts")
    images, rewards, meta = [], [], []
    for batch in sample_on_seeds(policy, prompts, [seed + i for i in range(len(prompts))],
                                 num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=eta,
                                 batch_size=batch_size, progress=progress, height=height, width=width):
        chunk = [prompts[i] for i in batch.indices]
        r, m = score(reward_fn, batch.images, chunk, [dict(given[i]) for i in batch.indices])
        images.append(batch.images.cpu())
        rewards.append(r)
        meta.append(m)
    return EvalResult(torch.cat(images), torch.cat(rewards), prompts, meta, given)


def prompt_diversity(images: torch.Tensor, prompts: Sequence[str]) -> float:
    """``diffrl evaluate``'s pixel diversity (mean pairwise RMS distance), averaged over the prompts that have at
    least two images; 0 means every prompt's images are one image (mode collapse)."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    values = [diversity(images[idx].flatten(1)) for idx in groups.values() if len(idx) > 1]
    return float(sum(values) / len(values)) if values else math.nan


def metadata_means(metadata: Sequence[Any]) -> dict[str, float]:
    """The mean of every numeric value a reward returned as metadata (``target_share`` of the digit reward...),
    over the batches, as ``eval/<key>``."""
    sums: dict[str, list[float]] = {}
    for item in metadata:
        if not isinstance(item, Mapping):
            continue
        for key, value in item.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype == torch.bool:
                value = float(value)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or str(key).startswith("_"):
                continue
            sums.setdefault(str(key), []).append(float(value))
    return {f"eval/{k}": sum(v) / len(v) for k, v in sums.items()}


class BestKeeper:
    """Keeps ``<run_dir>/best``: the policy with the highest evaluation reward so far (ddpo-celebahq's practice)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "best"
        self.best: float | None = None

    def update(self, policy: DiffusionPolicy, reward: float, epoch: int) -> bool:
        if self.best is not None and reward <= self.best:
            return False
        self.best = reward
        policy.save_pretrained(self.path)
        (self.path / "best_epoch.txt").write_text(f"epoch {epoch}\neval reward {reward:.6g}\n", encoding="utf-8")
        return True

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict | None) -> None:
        self.best = (state or {}).get("best")


class PeriodicEvaluator:
    """``eval_every``/``eval_num_samples``/``eval_seed``/``keep_best`` for any trainer: evaluates on the main
    process every ``eval_every`` epochs, logs ``eval/reward_mean``, ``eval/reward_std``, ``eval/diversity``, the
    hacking signs of :func:`diffrl.metrics.image_statistics` (``eval/brightness``, ``eval/dark_fraction``,
    ``eval/saturated_fraction``, ``eval/colour_entropy``), the held-out rewards (``eval_rewards``) as
    ``eval/heldout/<name>`` and every numeric reward-metadata value as ``eval/<key>``, and keeps the best
    policy."""

    def __init__(self, config, policy: DiffusionPolicy, reward_fn: Callable, prompt_fn: Callable, run_dir: Path,
                 accelerator, log_images: Callable[..., None] | None = None,
                 heldout: Mapping[str, Callable] | None = None) -> None:
        self.config, self.policy, self.reward_fn, self.accelerator = config, policy, reward_fn, accelerator
        self.log_images, self.heldout = log_images, dict(heldout or {})
        self.enabled = config.eval_every > 0
        # Drawn once, up front, so every evaluation scores the same prompts with the same noise.
        drawn = [prompt_fn() for _ in range(config.eval_num_samples)] if self.enabled else []
        self.prompts = [prompt for prompt, _ in drawn]
        self.prompt_metadata = [dict(metadata or {}) for _, metadata in drawn]  # what the reward reads (GenEval...)
        self.best = BestKeeper(run_dir) if config.keep_best else None

    def run(self) -> EvalResult:
        c = self.config
        return evaluate(self.policy, self.reward_fn, self.prompts, seed=c.eval_seed,
                        num_inference_steps=c.eval_num_steps or c.sample_num_steps,
                        guidance_scale=c.sample_guidance_scale, eta=c.sample_eta if c.sample_eta > 0 else 1.0,
                        batch_size=max(getattr(c, "sample_batch_size", c.train_batch_size), 16),
                        height=c.sample_height, width=c.sample_width, prompt_metadata=self.prompt_metadata)

    def maybe_run(self, epoch: int, global_step: int = 0) -> dict[str, float]:
        """Evaluate when ``epoch`` is due: the metrics, and the first 16 images to the trackers (``eval/samples``,
        the same seeds every time, so the panel shows the model changing)."""
        if not self.enabled or (epoch + 1) % self.config.eval_every:
            return {}
        metrics: dict[str, float] = {}
        main = self.accelerator.is_main_process
        if main or is_fully_sharded(self.policy.trainable_module):  # sharded: every process takes part in sampling
            result = self.run()
        if main:
            metrics = {"eval/reward_mean": result.reward_mean, "eval/reward_std": float(result.rewards.std()),
                       "eval/diversity": prompt_diversity(result.images, result.prompts),
                       **{f"eval/{k}": v for k, v in image_statistics(result.images).items()},
                       **metadata_means(result.metadata),
                       **{f"eval/{k}/mean": v for k, v in component_means(result.metadata).items()}}
            for name, fn in self.heldout.items():  # the same images, scored by rewards the run does not train on
                values, _ = score(fn, result.images, result.prompts, [dict(m) for m in result.prompt_metadata])
                metrics[f"eval/heldout/{name}"] = float(values.float().mean())
            if self.log_images is not None:
                shown = result.images[:16].float().cpu()
                self.log_images("eval/samples", shown, global_step, captions(result.prompts[: len(shown)],
                                                                             result.rewards[: len(shown)]))
            if self.best is not None:
                metrics["eval/is_best"] = float(self.best.update(self.policy, result.reward_mean, epoch))
        self.accelerator.wait_for_everyone()
        return metrics

    def state_dict(self) -> dict:
        return self.best.state_dict() if self.best else {}

    def load_state_dict(self, state: dict | None) -> None:
        if self.best:
            self.best.load_state_dict(state)
