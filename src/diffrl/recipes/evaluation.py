"""Evaluation on fixed seeds: the same initial and per-step noise every time, so runs and epochs compare."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch

from diffrl.recipes.rewards import score
from diffrl.recipes.run import generator_for


class EvalResult(NamedTuple):
    """``images``: ``[n, 3, H, W]`` in ``[0, 1]``; ``rewards``: ``[n]``; ``metadata``: one reward metadata per batch."""

    images: torch.Tensor
    rewards: torch.Tensor
    prompts: list[str]
    metadata: list[Any]

    @property
    def reward_mean(self) -> float:
        return float(self.rewards.mean())


@torch.no_grad()
def evaluate(policy, reward_fn: Callable, prompts: Sequence[str], *, seed: int, num_inference_steps: int,
             guidance_scale: float, eta: float, batch_size: int = 64) -> EvalResult:
    """Sample one image per prompt with seeds derived from ``seed`` only and score them."""
    images, rewards, meta = [], [], []
    prompts = list(prompts)
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start:start + batch_size]
        traj = policy.sample(chunk, batch_size=len(chunk), num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, eta=eta, generator=generator_for(seed, b)).trajectory
        r, m = score(reward_fn, traj.images, chunk, [{} for _ in chunk])
        images.append(traj.images.cpu())
        rewards.append(r)
        meta.append(m)
    return EvalResult(torch.cat(images), torch.cat(rewards), prompts, meta)


class BestKeeper:
    """Keeps ``<run_dir>/best``: the policy with the highest evaluation reward so far (ddpo-celebahq's practice)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "best"
        self.best: float | None = None

    def update(self, policy, reward: float, epoch: int) -> bool:
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
    process every ``eval_every`` epochs, logs ``eval/reward_mean``, and keeps the best policy."""

    def __init__(self, config, policy, reward_fn: Callable, prompt_fn: Callable, run_dir: Path, accelerator) -> None:
        self.config, self.policy, self.reward_fn, self.accelerator = config, policy, reward_fn, accelerator
        self.enabled = config.eval_every > 0
        # Drawn once, up front, so every evaluation scores the same prompts with the same noise.
        self.prompts = [prompt_fn()[0] for _ in range(config.eval_num_samples)] if self.enabled else []
        self.best = BestKeeper(run_dir) if config.keep_best else None

    def maybe_run(self, epoch: int) -> dict[str, float]:
        if not self.enabled or (epoch + 1) % self.config.eval_every:
            return {}
        metrics: dict[str, float] = {}
        if self.accelerator.is_main_process:
            c = self.config
            result = evaluate(self.policy, self.reward_fn, self.prompts, seed=c.eval_seed,
                              num_inference_steps=c.sample_num_steps, guidance_scale=c.sample_guidance_scale,
                              eta=c.sample_eta if c.sample_eta > 0 else 1.0, batch_size=max(getattr(c, "sample_batch_size", c.train_batch_size), 16))
            metrics = {"eval/reward_mean": result.reward_mean, "eval/reward_std": float(result.rewards.std())}
            if self.best is not None:
                metrics["eval/is_best"] = float(self.best.update(self.policy, result.reward_mean, epoch))
        self.accelerator.wait_for_everyone()
        return metrics

    def state_dict(self) -> dict:
        return self.best.state_dict() if self.best else {}

    def load_state_dict(self, state: dict | None) -> None:
        if self.best:
            self.best.load_state_dict(state)
