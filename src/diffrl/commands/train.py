"""``diffrl train CONFIG.yaml [field=value ...]``: config -> validated -> models -> trainer -> result."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from diffrl.config import AlignPropConfig, DDPOConfig, load_config


def make_trainer(config: DDPOConfig | AlignPropConfig, image_samples_hook=None):
    """Validate (before any model loads), then build policy, reward and prompts, then the trainer."""
    from accelerate import PartialState

    from diffrl.recipes.build import build_policy, build_prompt_fn, build_reward
    from diffrl.recipes.run import use_cpu_processes_without_gpus

    use_cpu_processes_without_gpus()
    config.validate(num_processes=PartialState().num_processes)
    reward = build_reward(config)
    if isinstance(config, AlignPropConfig) and getattr(reward, "differentiable", True) is False:
        raise ValueError(f"reward '{config.reward}' is not differentiable, so it cannot be backpropagated "
                         "(AlignProp/DRaFT/ReFL). Use a differentiable reward, or trainer=ddpo.")
    policy = build_policy(config)
    prompt_fn = build_prompt_fn(config, policy.is_conditional)
    if isinstance(config, AlignPropConfig):
        from diffrl.recipes.alignprop import AlignPropTrainer as Trainer
    else:
        from diffrl.recipes.ddpo import DDPOTrainer as Trainer
    return Trainer(config, reward, prompt_fn, policy, image_samples_hook=image_samples_hook)


def train_from_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> int:
    config = load_config(path, overrides)
    trainer = make_trainer(config)
    trainer.train()
    final = Path(trainer.run_dir) / "final"
    trainer.save_pretrained(str(final))
    if config.push_to_hub:
        url = trainer.push_to_hub(repo_id=trainer.run_name)
        trainer.accelerator.print(f"pushed to {url}")
    if trainer.accelerator.is_main_process:
        _write_curves_report(Path(trainer.run_dir))
    trainer.accelerator.print(f"run folder: {trainer.run_dir}\nfine-tuned model: {final}")
    return 0


def _write_curves_report(run_dir: Path) -> None:
    """``report.html`` with the run's curves, metrics and config (no sampling, so it costs nothing); ``diffrl report
    RUN_DIR`` adds base and fine-tuned samples from the same noise."""
    from diffrl.evaluate.report import write_report

    path = write_report(run_dir / "report.html", runs={run_dir.name: run_dir}, title=f"Training run {run_dir.name}")
    print(f"report: {path} (with samples of the base and fine-tuned model: diffrl report {run_dir})")
