"""The accelerator and the run's name: the process-level setup every trainer starts with."""

from __future__ import annotations

import datetime as _dt
import os
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, broadcast_object_list, set_seed

from diffrl.config import SharedConfig
from diffrl.recipes.sharding import FSDPSettings


def use_cpu_processes_without_gpus() -> None:
    """Several processes on a machine without GPUs: tell accelerate to join them over gloo on the CPU.

    ``accelerate launch --multi_gpu --num_processes 2`` (or torchrun) on a CPU-only machine starts the processes,
    but accelerate only forms a CPU process group when asked to; without this each process would train alone.
    Must run before the first ``PartialState``/``Accelerator``.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


class ShardingUnavailableError(ValueError):
    """The launch asked for DeepSpeed, but accelerate set up something else (nothing would be sharded)."""


SHARDING_REQUESTS = {"ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}
"""What ``accelerate launch --config_file configs/accelerate/zero2.yaml`` sets -> the distributed type. FSDP is not
here: diffrl applies FSDP2 itself (:mod:`diffrl.recipes.sharding`), on CPU processes as on GPUs."""


def check_requested_sharding(distributed_type: object) -> None:
    """Refuse a run whose launch asked for DeepSpeed when accelerate runs another type: without GPUs it silently
    falls back to data parallel (``MULTI_CPU``), where a user who chose sharding for memory would get every
    parameter on every process and a run that proves nothing about sharding. An FSDP launch is checked here too
    (its settings must be ones diffrl's own FSDP2 path honours), before any model loads."""
    FSDPSettings.requested()
    actual = str(getattr(distributed_type, "value", distributed_type))
    for variable, wanted in SHARDING_REQUESTS.items():
        if os.environ.get(variable, "").lower() in ("1", "true", "yes") and actual != wanted:
            why = "" if torch.cuda.is_available() else " (no GPU is visible: DeepSpeed runs on GPUs only)"
            raise ShardingUnavailableError(
                f"the launch asked for {wanted} ({variable}=true, from the accelerate config), but accelerate set up "
                f"{actual}{why}, so nothing would be sharded; run on GPUs, or launch without the {wanted} config "
                "(--multi_gpu: plain data parallel; configs/accelerate/fsdp.yaml shards on CPU processes too)")


def close_processes() -> None:
    """Leave the process group together at the end of a successful run: a barrier (no process exits while another
    still talks to it), then ``destroy_process_group``. Without it the first process to exit could tear down its
    gloo threads while another still used the group: rank 1 was seen aborting at exit ("terminate called without
    an active exception", SIGABRT) after a finished run, failing the launch."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def process_state() -> PartialState:
    """accelerate's process group, before the accelerator: CPU processes over gloo when there are no GPUs
    (``PartialState`` must be told ``cpu=True`` for that; the ``Accelerator`` reads the same flag)."""
    use_cpu_processes_without_gpus()
    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    check_requested_sharding(state.distributed_type)
    return state


def make_accelerator(config: SharedConfig, mixed_precision: str, run_dir: Path) -> Accelerator:
    """An accelerator with TRL's settings, the precision in force, and accelerate's project folders (its
    checkpoints and tracker event files) inside the run folder unless ``project_kwargs`` names others."""
    use_cpu_processes_without_gpus()
    project = ProjectConfiguration(**config.project_configuration_kwargs(run_dir))
    kwargs = dict(config.accelerator_kwargs)
    handlers = list(kwargs.pop("kwargs_handlers", None) or [])
    if not any(isinstance(h, DistributedDataParallelKwargs) for h in handlers):
        # No buffer broadcast at every forward: a diffusion network's buffers are constants (a transformer's
        # positional tables), and the broadcast is a collective that hangs any forward run on the main process
        # alone (the model card's samples, evaluation). A user's own DistributedDataParallelKwargs is kept.
        handlers.append(DistributedDataParallelKwargs(broadcast_buffers=False))
        # torch 2.13 renames it forward_sync_buffers, which accelerate's DistributedDataParallelKwargs cannot pass yet
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    accelerator = Accelerator(log_with=config.log_with, mixed_precision=mixed_precision, project_config=project,
                              kwargs_handlers=handlers, **kwargs)
    check_requested_sharding(accelerator.distributed_type)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def choose_run_name(config: SharedConfig, num_processes: int, resume_checkpoint: Path | None) -> str:
    """``run_name``, else the resumed run's folder, else ``<exp_name>_<timestamp>`` agreed by all processes."""
    if config.run_name:
        return config.run_name
    if resume_checkpoint is not None:
        return resume_checkpoint.parent.parent.name
    name = [f"{config.exp_name}_{_dt.datetime.now().strftime('%Y.%m.%d_%H.%M.%S')}"]
    if num_processes > 1:
        broadcast_object_list(name, from_process=0)
    return name[0]


def seed_processes(seed: int) -> None:
    """Seed Python, NumPy and torch; each process gets its own stream, reproducibly (accelerate's
    ``device_specific``). diffrl's own draws use :func:`diffrl.seeding.generator_for` and do not depend on it."""
    set_seed(seed, device_specific=True)
