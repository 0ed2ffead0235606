"""Optimizer, learning-rate schedule and the optimizer step every trainer takes."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler

from diffrl.config import SharedConfig


def build_optimizer(config: SharedConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA), or bitsandbytes' 8-bit AdamW with ``train_use_8bit_adam``."""
    if not params:
        raise ValueError("the policy has no trainable parameters (LoRA targets matched nothing, or all frozen).")
    kwargs = dict(lr=config.train_learning_rate, betas=(config.train_adam_beta1, config.train_adam_beta2),
                  weight_decay=config.train_adam_weight_decay, eps=config.train_adam_epsilon)
    if config.train_use_8bit_adam:
        import bitsandbytes as bnb  # optional extra, imported only when asked for

        return bnb.optim.AdamW8bit(params, **kwargs)
    if all(p.is_cuda for p in params):
        kwargs["fused"] = True
    return torch.optim.AdamW(params, **kwargs)


def build_lr_scheduler(config: SharedConfig, optimizer, total_steps: int):
    """The config's schedule: a diffusers name through ``diffusers.optimization.get_scheduler``, or
    ddpo-celebahq's ``warmup_cosine`` (linear warmup from ``lr_initial`` to the peak, then cosine decay to 0)."""
    plan = config.lr_schedule(total_steps)
    if plan.diffusers:
        return get_scheduler(plan.name, optimizer, num_warmup_steps=plan.warmup_steps,
                             num_training_steps=plan.total_steps, num_cycles=plan.num_cycles, power=plan.power)
    warmup, start = plan.warmup_steps, plan.initial_factor

    def factor(step: int) -> float:
        if step < warmup:
            return start + (1 - start) * step / max(1, warmup)
        progress = (step - warmup) / max(1, plan.total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_learning_rate(optimizer, lr_scheduler, lr: float) -> None:
    """Make ``lr`` the peak learning rate of a restored optimizer and schedule (a resume with a new
    ``train_learning_rate``): the schedule's factor then applies to the new peak."""
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    lr_scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    factors = [f(lr_scheduler.last_epoch) for f in lr_scheduler.lr_lambdas]
    for group, factor in zip(optimizer.param_groups, factors):
        group["lr"] = lr * factor
    lr_scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def apply_optimizer_settings(optimizer, lr_scheduler, config: SharedConfig, changed: Mapping[str, Any]) -> None:
    """After a resume with changed settings: the restored optimizer takes the new learning rate, betas, weight
    decay and epsilon for real (they live in its param groups, which ``load_state_dict`` restored)."""
    if "train_learning_rate" in changed:
        set_learning_rate(optimizer, lr_scheduler, config.train_learning_rate)
    for group in optimizer.param_groups:
        if "train_adam_beta1" in changed or "train_adam_beta2" in changed:
            group["betas"] = (config.train_adam_beta1, config.train_adam_beta2)
        if "train_adam_weight_decay" in changed:
            group["weight_decay"] = config.train_adam_weight_decay
        if "train_adam_epsilon" in changed:
            group["eps"] = config.train_adam_epsilon


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


def clip_gradients(accelerator: Accelerator, params: list[torch.nn.Parameter], max_grad_norm: float, *,
                   sharded: bool = False) -> torch.Tensor:
    """The total gradient norm before clipping (a tensor, no host sync); clips to ``max_grad_norm`` unless it is
    infinite. The divergence guard reads the norm at the optimizer step. Under DeepSpeed, which clips inside its
    engine (``gradient_clipping``) and returns no norm here, the engine's global norm of the last step. ``sharded``
    (FSDP2 shards): torch's clipping over the shards, whose norm is the whole gradient's (the same everywhere)."""
    if sharded:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    norm = accelerator.clip_grad_norm_(params, max_grad_norm)
    if norm is None:
        wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
        engine_norm = wrapped.engine.get_global_grad_norm() if wrapped is not None else None
        norm = torch.as_tensor(0.0 if engine_norm is None else float(engine_norm))
    return norm


def optimizer_step(optimizer, lr_scheduler) -> None:
    """Step the optimizer and the schedule, clear the gradients."""
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
