"""Run plumbing shared by the trainers: accelerator, run folder, metrics, optimizer, schedule, checkpoints."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, gather_object, set_seed
from safetensors.torch import load_file, save_file

from diffrl import checkpoint as ckpt
from diffrl.config import SharedConfig

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "lr_scheduler.pt"


def resolve_policy(sd_pipeline: Any):
    """The diffrl policy behind a TRL-style pipeline object (or the policy itself)."""
    policy = getattr(sd_pipeline, "policy", sd_pipeline)
    for attr in ("sample", "step_log_prob", "trainable_parameters", "save_pretrained"):
        if not hasattr(policy, attr):
            raise TypeError(
                f"sd_pipeline of type {type(sd_pipeline).__name__} is not a diffrl policy (no '{attr}'). Pass "
                "DefaultDDPOStableDiffusionPipeline / DefaultDDPODDPMPipeline, or a StableDiffusionPolicy / DDPMPolicy."
            )
    return policy


def use_cpu_processes_without_gpus() -> None:
    """Several processes on a machine without GPUs: tell accelerate to join them over gloo on the CPU.

    ``accelerate launch --num_processes 2`` (or torchrun) on a CPU-only machine starts the processes, but
    accelerate only forms a CPU process group when asked to; without this each process would train alone.
    Must run before the first ``PartialState``/``Accelerator``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def make_accelerator(config: SharedConfig) -> Accelerator:
    """An accelerator with TRL's settings, but the run folder wired in (TRL's saving crashed without it)."""
    use_cpu_processes_without_gpus()
    project = ProjectConfiguration(project_dir=config.logdir, automatic_checkpoint_naming=False, **config.project_kwargs)
    accelerator = Accelerator(log_with=config.log_with, mixed_precision=config.mixed_precision,
                              project_config=project, **config.accelerator_kwargs)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def choose_run_name(config: SharedConfig, accelerator: Accelerator, resume_checkpoint: Path | None) -> str:
    """``run_name``, else the resumed run's folder, else ``<exp_name>_<timestamp>`` agreed by all processes."""
    if config.run_name:
        return config.run_name
    if resume_checkpoint is not None:
        return resume_checkpoint.parent.parent.name
    name = [f"{config.exp_name}_{_dt.datetime.now().strftime('%Y.%m.%d_%H.%M.%S')}"]
    if accelerator.num_processes > 1:
        broadcast_object_list(name, from_process=0)
    return name[0]


def seed_everything(seed: int, accelerator: Accelerator) -> None:
    set_seed(seed, device_specific=True)  # each process its own stream, reproducibly


def generator_for(*parts: int) -> torch.Generator:
    """A CPU generator seeded from ``parts`` (seed, epoch, process, batch...), independent of the global RNG,
    so a resumed run draws the same noise as an uninterrupted one."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class MetricsLogger:
    """Namespaced metrics to the console, to ``metrics.jsonl`` in the run folder, and to accelerate's trackers."""

    def __init__(self, accelerator: Accelerator, run_dir: Path, quiet: bool = False) -> None:
        self.accelerator = accelerator
        self.path = run_dir / "metrics.jsonl"
        self.quiet = quiet

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items()}
        self.accelerator.log(clean, step=step)
        if not self.accelerator.is_main_process:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if not self.quiet:
            keys = [k for k in ("epoch", "reward/mean", "reward/std", "loss/policy", "stats/approx_kl",
                                "stats/clipfrac", "perf/epoch_s") if k in clean]
            print(" ".join(f"{k}={clean[k]:.4g}" for k in keys), file=sys.stderr, flush=True)


def build_optimizer(config: SharedConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("the policy has no trainable parameters (LoRA targets matched nothing, or all frozen).")
    cls = torch.optim.AdamW
    if config.train_use_8bit_adam:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit
    return cls(params, lr=config.train_learning_rate, betas=(config.train_adam_beta1, config.train_adam_beta2),
               weight_decay=config.train_adam_weight_decay, eps=config.train_adam_epsilon)


def build_lr_scheduler(config: SharedConfig, optimizer, total_steps: int):
    """Constant, or ddpo-celebahq's linear warmup from ``lr_initial`` to the peak, then cosine decay to 0."""
    peak = config.train_learning_rate
    if config.lr_scheduler == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    warmup = int(round(config.lr_warmup_fraction * total_steps))
    start = config.lr_initial / peak

    def factor(step: int) -> float:
        if step < warmup:
            return start + (1 - start) * step / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def trainable_state(policy) -> dict[str, torch.Tensor]:
    unet = getattr(policy, "_unet", policy.unet)
    return {n: p.detach().to("cpu").contiguous() for n, p in unet.named_parameters() if p.requires_grad}


def save_checkpoint(accelerator: Accelerator, checkpoints_dir: Path, epoch: int, keep: int, policy, optimizer,
                    lr_scheduler, state: dict[str, Any]) -> Path | None:
    """Every process takes part (no process waits on a save the others skip: TRL's multi-GPU hang).

    Each process's RNG state is gathered; the main process writes weights, optimizer, scheduler, RNGs and
    ``state`` atomically, then drops old checkpoints.
    """
    rng_states = gather_object([ckpt.save_rng_state()]) if accelerator.num_processes > 1 else [ckpt.save_rng_state()]
    target = checkpoints_dir / ckpt.checkpoint_name(epoch)
    if accelerator.is_main_process:
        def write(tmp: Path) -> None:
            save_file(trainable_state(policy), tmp / TRAINABLE_FILE)
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            torch.save(lr_scheduler.state_dict(), tmp / SCHEDULER_FILE)
            for rank, rng in enumerate(rng_states):
                torch.save(rng, tmp / f"rng_{rank}.pt")

        ckpt.save_atomically(target, write, state={"epoch": epoch, **state})
        ckpt.rotate(checkpoints_dir, keep)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(accelerator: Accelerator, path: Path, policy, optimizer, lr_scheduler) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the saved trainer state."""
    state = ckpt.read_state(path)
    unet = getattr(policy, "_unet", policy.unet)
    saved = load_file(path / TRAINABLE_FILE)
    params = dict(unet.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    if missing or any(n not in params for n in saved):
        raise ValueError(f"checkpoint {path} does not match this model's trainable weights "
                         f"(missing {missing[:3]}, unexpected {[n for n in saved if n not in params][:3]}); "
                         "resume with the same model, use_lora and LoRA settings.")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, weights_only=True))
    rng_file = path / f"rng_{accelerator.process_index}.pt"
    if rng_file.is_file():
        ckpt.load_rng_state(torch.load(rng_file, weights_only=True))
    return state.get("state", state)


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed


def call_image_hook(hook: Callable | None, data: Any, global_step: int, accelerator: Accelerator) -> None:
    """TRL's hook contract, with the tracker or ``None`` (no IndexError without a tracker or off the main process)."""
    if hook is None:
        return
    tracker = accelerator.trackers[0] if accelerator.trackers else None
    hook(data, global_step, tracker)


def write_model_card(directory: Path, config: SharedConfig, metrics: dict[str, float], trainer: str,
                     base_model: str | None) -> None:
    lines = [
        "---", "library_name: diffusers", "tags: [diffrl, " + trainer.lower() + ", reinforcement-learning]", "---", "",
        f"# {trainer} fine-tune of {base_model or 'a diffusion model'}", "",
        f"Trained with [diffrl]'s {trainer} trainer.", "", "## Final metrics", "",
    ]
    lines += [f"- `{k}`: {v:.6g}" for k, v in sorted(metrics.items())] or ["(none logged)"]
    lines += ["", "## Configuration", "", "```yaml", config.to_yaml().rstrip(), "```", ""]
    (directory / "README.md").write_text("\n".join(lines), encoding="utf-8")


def push_folder_to_hub(directory: Path, repo_id: str, commit_message: str) -> str:
    """Upload ``directory``; the token comes from ``HF_TOKEN`` or the login cache and is never printed."""
    from huggingface_hub import HfApi

    api = HfApi(token=os.environ.get("HF_TOKEN") or None)
    api.create_repo(repo_id, exist_ok=True)
    info = api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message=commit_message)
    return str(getattr(info, "commit_url", repo_id))
