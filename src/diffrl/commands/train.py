"""``diffrl train CONFIG.yaml [field=value ...]``: config -> checked -> models -> trainer -> result -> report -> push.

Everything that can be checked before a model loads is checked first (:func:`preflight`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

from diffrl import build
from diffrl import checkpoint as ckpt
from diffrl.config import SharedConfig, load_config, registry
from diffrl.evaluate.report import write_report
from diffrl.recipes.accelerator import process_state
from diffrl.run_folder import CONFIG_FILE


class PreflightError(ValueError):
    """A setting that would fail later, found before any model loads; the message names it and the fix."""


def preflight(config: SharedConfig) -> None:
    """Check ``resume_from`` and that ``logdir`` is writable, before models load (reward and prompt names are
    checked by their registries when :func:`make_trainer` builds them, also before the model loads)."""
    if config.resume_from:
        try:
            found = ckpt.find_latest(config.resume_from)
        except ckpt.NoCheckpointError as err:
            raise PreflightError(f"resume_from={config.resume_from!r}: {err}") from None
        _check_resumed_model(config, found)
    logdir = Path(config.logdir)
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=logdir, prefix=".diffrl-write-test-"):
            pass
    except OSError as err:
        raise PreflightError(f"logdir={config.logdir!r} is not writable ({err.strerror}); set logdir to a folder "
                             "you can write to") from None


def _check_resumed_model(config: SharedConfig, checkpoint: Path) -> None:
    """The checkpoint's weights belong to the model its run trained (the run folder's ``config.yaml`` two levels
    up): another model, above all one of another family (a UNet's weights resumed into a flow transformer), is
    refused here, naming both, before any weights load. A run folder's own record is also checked field by field
    once the run starts."""
    record = checkpoint.parent.parent / CONFIG_FILE
    if not record.is_file():
        return
    recorded = load_config(record, recorded=True)
    ours, theirs = build.base_model(config), build.base_model(recorded)
    if ours == theirs:
        return
    words = {}
    for name, source in (("ours", config), ("theirs", recorded)):
        try:
            words[name] = build.model_family(source).description
        except Exception:  # noqa: BLE001 - a model that cannot be read: named by its path alone
            words[name] = "a model"
    raise PreflightError(f"resume_from={config.resume_from!r}: the checkpoint trained {theirs!r} "
                         f"({words['theirs']}), but model={ours!r} ({words['ours']}); its weights fit only the model "
                         f"they were trained on. Fix: set model={theirs!r} to resume, or start a new run without "
                         "resume_from")


def make_trainer(config: SharedConfig, image_samples_hook=None):
    """Validate and preflight (before any model loads), then build policy, reward and prompts, then the trainer
    the config's registry entry names."""
    config.validate(num_processes=process_state().num_processes)
    preflight(config)
    spec = registry.spec_of(type(config))
    trainer_cls = registry.resolve(spec.trainer)
    build.check_model_settings(config)  # reads the model's small files only
    reward = build.build_reward(config)  # rewards and prompt sources load lazily: their names fail here, cheaply
    prompt_fn = build.build_prompt_fn(config, conditional=True) if config.prompts is not None else None
    build.build_eval_prompt_fn(config)  # a bad held-out source or reward fails here too, before the model loads
    build.build_eval_rewards(config)
    policy = build.build_policy(config)
    prompt_fn = prompt_fn or build.build_prompt_fn(config, policy.is_conditional)
    return trainer_cls(config, reward, prompt_fn, policy, image_samples_hook=image_samples_hook)


def train_from_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> int:
    """Train, save ``final/``, write ``report.html``, then push (a failed push leaves everything local intact)."""
    config = load_config(path, overrides)
    trainer = make_trainer(config)
    trainer.train()
    final = Path(config.final_dir(trainer.run_dir))
    trainer.save_pretrained(str(final))
    if trainer.accelerator.is_main_process:
        write_curves_report(Path(trainer.run_dir))
    policy = trainer.policy
    lora = f"LoRA rank {policy.lora.rank}, alpha {policy.lora.alpha:g}" if policy.use_lora else "all weights"
    trainer.accelerator.print(f"trained {type(trainer).__name__} on {build.base_model(config)} ({policy.description}, "
                              f"{lora}) for {trainer.first_epoch} epochs\nrun folder: {trainer.run_dir}\n"
                              f"fine-tuned model: {final}")
    if config.push_to_hub:
        url = trainer.push_to_hub()
        trainer.accelerator.print(f"pushed to {url}")
    return 0


def write_curves_report(run_dir: Path) -> Path:
    """``report.html`` with the run's curves, metrics and config (no sampling, so it costs nothing); ``diffrl report
    RUN_DIR`` adds base and fine-tuned samples from the same noise."""
    path = write_report(run_dir / "report.html", runs={run_dir.name: run_dir}, title=f"Training run {run_dir.name}")
    print(f"report: {path} (with samples of the base and fine-tuned model: diffrl report {run_dir})")
    return path
