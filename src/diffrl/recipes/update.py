"""The one update loop of every trainer: micro-steps with gradient accumulation, ``no_sync`` until the step,
backward, clipping, the divergence guard, the optimizer and schedule step.

A recipe builds one :class:`UpdateLoop` in its ``setup`` (it also hands the trained module and the optimizer to
accelerate) and feeds it :class:`MicroStep` s; the accumulation rule is nanoGPT's: gradients are synchronised and
the optimizer steps when the micro-steps so far fill a whole update.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ContextManager, Iterable, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from diffrl.config import SharedConfig
from diffrl.pipelines.types import DiffusionPolicy
from diffrl.recipes.checkpoints import is_sharded
from diffrl.recipes.guard import DivergenceGuard
from diffrl.recipes.optim import (average_gradients, build_lr_scheduler, build_optimizer, clip_gradients,
                                  optimizer_step)
from diffrl.recipes.sharding import FSDPSettings, ShardingError, fsdp_compute_dtype, shard

Stats = dict[str, list[torch.Tensor]]
LossFn = Callable[[Any], tuple[torch.Tensor, list[dict[str, torch.Tensor]]]]


class MicroStep(NamedTuple):
    """One forward/backward call: ``batch`` goes to the recipe's loss function, and the call counts as ``size``
    micro-steps of the accumulation (a fused call of ``K`` timesteps counts ``K``)."""

    size: int
    batch: Any


def configure_deepspeed(accelerator: Accelerator, config: SharedConfig, backward_calls: int) -> None:
    """Under DeepSpeed, fill what its engine needs before ``prepare`` and diffrl's trainers cannot give it through
    a dataloader: ``train_micro_batch_size_per_gpu`` (``train_batch_size``), ``gradient_accumulation_steps`` (the
    backward calls per optimizer step), ``train_batch_size`` and ``gradient_clipping``
    (``train_max_grad_norm``; DeepSpeed clips inside its step). A no-op otherwise."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if accelerator.distributed_type != DistributedType.DEEPSPEED or plugin is None:
        return
    ds = plugin.deepspeed_config
    micro = int(config.train_batch_size)
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = int(backward_calls)
    ds["train_batch_size"] = micro * int(backward_calls) * accelerator.num_processes
    if math.isfinite(config.train_max_grad_norm):
        ds["gradient_clipping"] = float(config.train_max_grad_norm)
    else:
        ds.pop("gradient_clipping", None)


class UpdateLoop:
    """The optimizer, its schedule and the update loop of one run.

    ``total_steps``: optimizer steps of the whole run (the schedule's length); ``backward_calls``: backward calls
    per optimizer step (DeepSpeed's accumulation). ``wrap``: hand the trained module to accelerate (DDP); a
    recipe that calls the model several times per backward pass (reward backpropagation) keeps it unwrapped and
    the gradients are averaged over processes at each step instead. Under DeepSpeed the module is always prepared
    (sharding needs it); under FSDP diffrl shards it itself (:mod:`diffrl.recipes.sharding`) and accelerate wraps
    neither the module nor the optimizer.
    """

    def __init__(self, accelerator: Accelerator, policy: DiffusionPolicy, config: SharedConfig,
                 guard: DivergenceGuard, *, total_steps: int, backward_calls: int, wrap: bool = True) -> None:
        self.accelerator, self.policy, self.config, self.guard = accelerator, policy, config, guard
        self.fsdp = FSDPSettings.requested()  # the launch asked for FSDP: diffrl shards the trained module itself
        if self.fsdp is not None:
            if getattr(config, "keep_best", False):
                raise ShardingError("keep_best=true with FSDP: keeping the best policy is not implemented for sharded "
                                    "weights yet; set keep_best=false (checkpoints and final/ are saved whole)")
            shard(policy.trainable_module, self.fsdp, fsdp_compute_dtype(accelerator.mixed_precision))
        optimizer = build_optimizer(config, list(policy.trainable_parameters()))  # over the shards, when sharded
        self.lr_scheduler = build_lr_scheduler(config, optimizer, total_steps)
        configure_deepspeed(accelerator, config, backward_calls)
        self.module: torch.nn.Module | None = None  # what accelerate prepared of the trained module
        if self.fsdp is not None:  # FSDP2 reduce-scatters the gradients itself; accelerate wraps nothing
            self.optimizer = optimizer
        elif wrap or is_sharded(accelerator):
            self.module, self.optimizer = accelerator.prepare(policy.trainable_module, optimizer)
            policy.use_forward_module(self.module)
        else:
            self.optimizer = accelerator.prepare(optimizer)
        self.average_explicitly = self.module is None and self.fsdp is None and accelerator.num_processes > 1
        # Sharding (FSDP2) replaces the parameters in place: clip and check the ones training really updates.
        self.params = list(policy.trainable_parameters())

    @property
    def learning_rate(self) -> float:
        return self.lr_scheduler.get_last_lr()[0]

    def backward(self, loss: torch.Tensor, sync: bool = True) -> None:
        """``accelerator.backward(loss)`` where ``sync`` says whether this call ends an accumulation. Under
        DeepSpeed, whose engine steps inside ``backward``, ``sync`` becomes its accumulation boundary and the
        loss (already divided here) is not divided again."""
        acc = self.accelerator
        if acc.distributed_type == DistributedType.DEEPSPEED:
            acc.gradient_state._set_sync_gradients(sync)
            acc.backward(loss, scale_wrt_gas=False)
        else:
            acc.backward(loss)

    def step(self, epoch: int, global_step: int, stats: Stats) -> int:
        """Average the gradients (unwrapped module on several processes), clip them (recording
        ``stats/grad_norm``), stop if they are not finite (before the step, so the weights stay the last finite
        ones), step the optimizer and the schedule; returns the new global step."""
        if self.average_explicitly:
            average_gradients(self.accelerator, self.params)
        norm = clip_gradients(self.accelerator, self.params, self.config.train_max_grad_norm,
                              sharded=self.fsdp is not None)
        self.guard.check_gradients(norm, epoch, global_step, self.learning_rate)
        stats.setdefault("stats/grad_norm", []).append(norm.detach())
        optimizer_step(self.optimizer, self.lr_scheduler)
        return global_step + 1

    def _no_sync(self, sync: bool) -> ContextManager:
        if sync or self.module is None or self.accelerator.num_processes == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.module)

    def run(self, steps: Iterable[MicroStep], loss_fn: LossFn, *, per_update: int, epoch: int, global_step: int,
            stats: Stats, desc: str, total: int | None = None,
            around: Callable[[], ContextManager] | None = None) -> int:
        """Train on ``steps``: each call's ``loss_fn(batch)`` gives its loss (the mean over its rows) and one stats
        dict per micro-step it covers; ``backward(loss * size / per_update)`` accumulates exactly the gradient of
        the micro-steps one by one. Gradients synchronise and the optimizer steps whenever the micro-steps so far
        are a multiple of ``per_update``. ``around()`` wraps each call (e.g. a memory probe). Returns the global
        step."""
        micro = 0
        self.policy.train()
        for part in tqdm(steps, desc=desc, total=total, disable=not self.accelerator.is_local_main_process,
                         leave=False):
            micro += part.size
            sync = micro % per_update == 0
            with self._no_sync(sync), (around() if around is not None else contextlib.nullcontext()):
                loss, infos = loss_fn(part.batch)
                self.backward(loss * (part.size / per_update), sync)
            for info in infos:
                for key, value in info.items():
                    stats.setdefault(key, []).append(value.detach() if isinstance(value, torch.Tensor) else value)
            if sync:
                global_step = self.step(epoch, global_step, stats)
        self.policy.eval()
        return global_step
