"""The offline main job: fine-tune the shipped digits DDPM toward one digit, and show what changed.

Leaves in the run folder: ``grid_before_after.png`` (same noise, before and after), ``reward_curve.png``,
``metrics.jsonl``, ``final/`` (a ``DDPMPipeline`` folder; LoRA runs also get ``final_merged/``),
``summary.json``, ``report.html`` (what ``diffrl report`` writes: samples of the base and the fine-tuned model from
the same noise, the metric table, the training curves and the config); prints a one-screen summary ending with
the run folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch

from diffrl.checkpoint import write_text_atomically
from diffrl.config import load_config
from diffrl.presets import preset_path
from diffrl.recipes.artifacts import image_grid, reward_curve
from diffrl.recipes.evaluation import evaluate
from diffrl.recipes.launch import make_trainer

_BACKPROP = {"alignprop", "draft_k", "draft_lv", "refl"}


def _preset_for(overrides: Sequence[str]) -> str:
    """``quickstart_alignprop`` when the overrides ask for reward backpropagation, else ``quickstart`` (DDPO)."""
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() in ("trainer", "algorithm") and value.strip() in _BACKPROP:
            return "quickstart_alignprop"
    return "quickstart"


def _target_share(images: torch.Tensor, target: int) -> float:
    from diffrl.digits import digit_shares

    return float(digit_shares(images)[target])


def run_quickstart(overrides: Sequence[str] = ()) -> int:
    start = time.perf_counter()
    config = load_config(preset_path(_preset_for(overrides)), overrides)
    trainer = make_trainer(config)
    acc, policy = trainer.accelerator, trainer.policy
    target = int(config.reward_options.get("digit", 3)) if config.reward in (None, "digit") else None
    eta = config.sample_eta if config.sample_eta > 0 else 1.0

    def measure():
        return evaluate(policy, trainer.reward_fn, [""] * config.eval_num_samples, seed=config.eval_seed,
                        num_inference_steps=config.sample_num_steps, guidance_scale=1.0, eta=eta, batch_size=128)

    before = measure() if acc.is_main_process else None
    trainer.train()
    acc.wait_for_everyone()
    final = Path(trainer.run_dir) / "final"
    trainer.save_pretrained(str(final))
    if not acc.is_main_process:
        return 0
    after = measure()
    run_dir = Path(trainer.run_dir)
    if policy.use_lora:
        _save_merged(policy, run_dir / "final_merged")
    image_grid([before.images[:16], after.images[:16]], run_dir / "grid_before_after.png",
               labels=["before", "after"])
    reward_curve(run_dir / "metrics.jsonl", run_dir / "reward_curve.png")
    report = _write_report(run_dir, str(acc.device))
    seconds = time.perf_counter() - start
    summary = {
        "trainer": type(trainer).__name__, "reward": config.reward or f"digit {target} log-probability",
        "target_digit": target, "eval_samples": config.eval_num_samples, "eval_seed": config.eval_seed,
        "reward_before": before.reward_mean, "reward_after": after.reward_mean,
        "target_share_before": _target_share(before.images, target) if target is not None else None,
        "target_share_after": _target_share(after.images, target) if target is not None else None,
        "epochs": config.num_epochs, "seconds": round(seconds, 1), "run_dir": str(run_dir),
        "model": str(final), "report": str(report),
    }
    write_text_atomically(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    _print_summary(summary)
    return 0


def _write_report(run_dir: Path, device: str) -> Path:
    """``report.html``: the base and the fine-tuned model on 16 shared seeds, scored, with the run's curves."""
    from diffrl.evaluate.report import write_report
    from diffrl.evaluate.runs import compare_run

    evaluation = compare_run(run_dir, seeds=range(16), device=device, batch_size=16)
    return write_report(run_dir / "report.html", evaluation=evaluation, runs={run_dir.name: run_dir},
                        title=f"diffrl quickstart: {run_dir.name}")


def _save_merged(policy, directory: Path) -> None:
    """A plain ``DDPMPipeline`` folder with the LoRA update merged into the UNet weights."""
    import copy

    from diffusers import DDPMPipeline
    from peft.tuners.lora import LoraModel  # noqa: F401  (peft's merge lives on the injected layers)

    unet = copy.deepcopy(policy._unet).float()
    for module in unet.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    state = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    clean = type(policy._unet).from_config(policy._unet.config)
    clean.load_state_dict(state)
    DDPMPipeline(unet=clean, scheduler=policy.pipeline.scheduler).save_pretrained(directory)


def _print_summary(s: dict) -> None:
    lines = ["", "=" * 64, f"diffrl quickstart: {s['trainer']} on the 8x8 digits DDPM", f"reward: {s['reward']}"]
    if s["target_digit"] is not None:
        lines.append(f"share of samples classified as digit {s['target_digit']} ({s['eval_samples']} fixed seeds): "
                     f"{100 * s['target_share_before']:.1f}% -> {100 * s['target_share_after']:.1f}%")
    lines += [f"mean eval reward: {s['reward_before']:.4g} -> {s['reward_after']:.4g}",
              f"time: {s['seconds']:.0f} s for {s['epochs']} epochs",
              "before/after grid: grid_before_after.png   reward curve: reward_curve.png",
              "report (open in a browser): report.html",
              f"fine-tuned model (DDPMPipeline.from_pretrained): {s['model']}",
              "=" * 64, f"run folder: {s['run_dir']}"]
    print("\n".join(lines), flush=True)
