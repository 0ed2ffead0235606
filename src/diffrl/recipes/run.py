"""Run plumbing shared by the trainers: accelerator, run folder, metrics, optimizer, schedule, checkpoints."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

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


def load_trainable_weights(policy, path: Path) -> None:
    """Copy a checkpoint's trainable weights (LoRA adapters or the whole UNet) into ``policy``, which must have
    been built with the run's model, ``use_lora`` and LoRA settings."""
    unet = getattr(policy, "_unet", policy.unet)
    saved = load_file(path / TRAINABLE_FILE)
    params = dict(unet.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    if missing or any(n not in params for n in saved):
        raise ValueError(f"checkpoint {path} does not match this model's trainable weights "
                         f"(missing {missing[:3]}, unexpected {[n for n in saved if n not in params][:3]}); "
                         "load it with the same model, use_lora and LoRA settings as its run.")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def load_checkpoint(accelerator: Accelerator, path: Path, policy, optimizer, lr_scheduler) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the saved trainer state."""
    state = ckpt.read_state(path)
    load_trainable_weights(policy, path)
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


# ---------------------------------------------------------------------- pieces every trainer's start and end share


class RunStart(NamedTuple):
    """What :func:`start_run` set up: the accelerator, the policy on its device, the run folder and the logger.

    ``resume`` is the checkpoint to continue from (``None`` for a fresh run); ``checkpoints_dir`` is
    ``<logdir>/<run_name>/checkpoints``.
    """

    accelerator: Accelerator
    policy: Any
    resume: Path | None
    run_name: str
    run_dir: Path
    checkpoints_dir: Path
    metrics: MetricsLogger


def start_run(config: SharedConfig, sd_pipeline: Any) -> RunStart:
    """The start of every trainer: accelerator, config validation (all processes counted), the policy behind
    ``sd_pipeline``, the checkpoint to resume from, the run folder with ``config.yaml``, seeds, device and
    precision, trackers and the metrics logger."""
    acc = make_accelerator(config)
    config.validate(num_processes=acc.num_processes)
    policy = resolve_policy(sd_pipeline)
    resume = ckpt.find_latest(config.resume_from) if config.resume_from else None
    run_name = choose_run_name(config, acc, resume)
    run_dir = Path(config.logdir) / run_name
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    seed_everything(config.seed, acc)
    policy.to(acc.device, config.mixed_precision)
    if config.log_with:
        acc.init_trackers(config.tracker_project_name, config=config.to_flat_dict(), init_kwargs=config.tracker_kwargs)
    return RunStart(acc, policy, resume, run_name, run_dir, ckpt.checkpoint_dir(config.logdir, run_name),
                    MetricsLogger(acc, run_dir))


def is_checkpoint_epoch(config: SharedConfig, epoch: int) -> bool:
    """Checkpoint after every ``save_freq``-th epoch and after the last one."""
    return (epoch + 1) % config.save_freq == 0 or epoch + 1 == config.num_epochs


def average_gradients(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over all processes (one all-reduce of their concatenation).

    For a trainer whose model is not wrapped in DistributedDataParallel: reward backpropagation calls the UNet
    several times per backward pass (once per step that carries gradients, recomputed under checkpointing),
    which DDP's once-per-iteration gradient hooks do not allow.
    """
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()


def optimizer_step(accelerator: Accelerator, params: list[torch.nn.Parameter], optimizer, lr_scheduler,
                   max_grad_norm: float) -> float | None:
    """Clip (unless ``max_grad_norm`` is infinite), step the optimizer and the schedule, clear the gradients.

    Returns the gradient norm before clipping, or ``None`` when not clipping.
    """
    norm = None
    if max_grad_norm != float("inf"):
        norm = float(accelerator.clip_grad_norm_(params, max_grad_norm))
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def save_result(accelerator: Accelerator, policy, config: SharedConfig, metrics: dict[str, float], trainer: str,
                directory: str | os.PathLike) -> None:
    """Write the fine-tuned model (LoRA weights or a full pipeline) and a model card; all processes call it.

    A new folder is written under a hidden sibling name and renamed when complete, so a failure mid-save never
    leaves a partial result that looks finished; an existing folder is written into, as diffusers does."""
    if accelerator.is_main_process:
        path = Path(directory)

        def write(folder: Path) -> None:
            policy.save_pretrained(folder)
            write_model_card(folder, config, metrics, trainer, policy.base_model)

        if path.exists():
            write(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                write(tmp)
                os.replace(tmp, path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()


def push_result(accelerator: Accelerator, policy, config: SharedConfig, metrics: dict[str, float], trainer: str,
                repo_id: str, commit_message: str) -> str | None:
    """Save to a temporary folder and upload it (token from ``HF_TOKEN`` or the login cache, never logged)."""
    import tempfile

    url = None
    with tempfile.TemporaryDirectory() as tmp:
        save_result(accelerator, policy, config, metrics, trainer, tmp)
        if accelerator.is_main_process:
            url = push_folder_to_hub(Path(tmp), repo_id, commit_message)
    accelerator.wait_for_everyone()
    return url


def peak_memory_metrics(device: torch.device) -> dict[str, float]:
    """``perf/peak_memory_mb``: the accelerator's peak allocated memory since the last reset (CUDA only;
    an empty dict elsewhere), then resets the peak so each epoch reports its own."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    torch.cuda.reset_peak_memory_stats(device)
    return {"perf/peak_memory_mb": peak}
