"""The offline main job: fine-tune the shipped digits DDPM toward one digit, and show what changed.

Leaves in the run folder: ``grid_before_after.png`` (same noise, base model and fine-tuned), ``reward_curve.png``,
``metrics.jsonl``, ``final/`` (a ``DDPMPipeline`` folder; LoRA runs also get ``final_merged/``), ``summary.json``,
``report.html`` (what ``diffrl report`` writes: samples of the base and the fine-tuned model from the same noise,
the metric table, the training curves and the config); prints a one-screen summary ending with the run folder.
"Before" figures always come from the base model, also when the run resumed from a checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch

from diffrl import build
from diffrl.checkpoint import write_text_atomically
from diffrl.commands.train import make_trainer
from diffrl.config import load_config
from diffrl.digits import digit_shares
from diffrl.evaluate.loading import load_model
from diffrl.evaluate.plots import image_grid, reward_curve
from diffrl.pipelines.sharded import is_fully_sharded
from diffrl.evaluate.report import write_report
from diffrl.evaluate.runs import compare_run
from diffrl.presets import quickstart_preset
from diffrl.run_folder import read_metrics
from diffrl.recipes.evaluation import EvalResult, evaluate


def _target_share(images: torch.Tensor, target: int) -> float:
    return float(digit_shares(images)[target])


def run_quickstart(overrides: Sequence[str] = ()) -> int:
    start = time.perf_counter()
    config = load_config(quickstart_preset(overrides), overrides)
    trainer = make_trainer(config)
    acc, policy = trainer.accelerator, trainer.policy
    target = int(config.reward_options.get("digit", 3)) if config.reward in (None, "digit") else None
    eta = config.sample_eta if config.sample_eta > 0 else 1.0

    def measure(model) -> EvalResult:
        return evaluate(model, trainer.reward_fn, [""] * config.eval_num_samples, seed=config.eval_seed,
                        num_inference_steps=config.sample_num_steps, guidance_scale=1.0, eta=eta, batch_size=128)

    resumed = trainer.first_epoch > 0
    # A sharded policy (FSDP2) samples on every process (each forward is collective); an unsharded one on the main
    # process alone. "Before" is always the base model: after a resume, a fresh unsharded copy on the main process.
    sharded = is_fully_sharded(policy.trainable_module)
    before = None
    if resumed and acc.is_main_process:
        before = measure(build.build_policy(config, device=acc.device))
    elif not resumed and (acc.is_main_process or sharded):
        before = measure(policy)
    trainer.train()
    acc.wait_for_everyone()
    run_dir = Path(trainer.run_dir)
    trainer.save_pretrained(str(run_dir / "final"))
    after = measure(policy) if acc.is_main_process or sharded else None
    if not acc.is_main_process:
        return 0
    if build.uses_lora(config):  # from the saved (whole) result, which a sharded policy is not
        load_model(str(run_dir / "final"), strict_base=False).policy.save_merged(run_dir / "final_merged")
    image_grid([before.images[:16], after.images[:16]], run_dir / "grid_before_after.png", labels=["base", "tuned"])
    reward_curve(run_dir / "metrics.jsonl", run_dir / "reward_curve.png")
    # The report scores the summary's seeds (eval_num_samples of them, from eval_seed) and shows the first 8.
    evaluation = compare_run(run_dir, seeds=range(config.eval_seed, config.eval_seed + config.eval_num_samples),
                             device=str(acc.device), batch_size=128, config=config, preview_seeds=8)
    report = write_report(run_dir / "report.html", evaluation=evaluation, runs={run_dir.name: run_dir},
                          title=f"diffrl quickstart: {run_dir.name}")
    summary = {
        "trainer": type(trainer).__name__, "reward": config.reward or f"digit {target} log-probability",
        "target_digit": target, "eval_samples": config.eval_num_samples, "eval_seed": config.eval_seed,
        "reward_before": before.reward_mean, "reward_after": after.reward_mean,
        "target_share_before": _target_share(before.images, target) if target is not None else None,
        "target_share_after": _target_share(after.images, target) if target is not None else None,
        "epochs": _epochs_run(run_dir), "seconds": round(time.perf_counter() - start, 1), "run_dir": str(run_dir),
        "model": str(run_dir / "final"), "report": str(report), "resumed": resumed,
        "stopped": trainer.stop_reason or None,
    }
    write_text_atomically(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    _print_summary(summary)
    if config.push_to_hub:
        print(f"pushed to {trainer.push_to_hub()}", flush=True)
    return 0


def _epochs_run(run_dir: Path) -> int:
    """Epochs the run has trained (resumed ones included): fewer than ``num_epochs`` when ``stop_below`` /
    ``stop_above`` ended it."""
    epochs = [m["epoch"] for m in read_metrics(run_dir / "metrics.jsonl") if "epoch" in m]
    return int(max(epochs)) + 1 if epochs else 0


def _print_summary(s: dict) -> None:
    lines = ["", "=" * 64, f"diffrl quickstart: {s['trainer']} on the 8x8 digits DDPM", f"reward: {s['reward']}"]
    if s["target_digit"] is not None:
        lines.append(f"share of samples classified as digit {s['target_digit']} ({s['eval_samples']} fixed seeds): "
                     f"{100 * s['target_share_before']:.1f}% -> {100 * s['target_share_after']:.1f}%")
    lines += [f"mean eval reward: {s['reward_before']:.4g} -> {s['reward_after']:.4g}",
              f"time: {s['seconds']:.0f} s for {s['epochs']} epochs"
              + (f" (stopped early: {s['stopped']})" if s.get("stopped") else ""),
              "before/after grid: grid_before_after.png   reward curve: reward_curve.png",
              "report (open in a browser): report.html",
              f"fine-tuned model (DDPMPipeline.from_pretrained): {s['model']}",
              "=" * 64, f"run folder: {s['run_dir']}"]
    print("\n".join(lines), flush=True)
