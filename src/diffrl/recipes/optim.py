"""Optimizer, learning-rate schedule and the optimizer step every trainer takes."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator

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


def clip_gradients(accelerator: Accelerator, params: list[torch.nn.Parameter], max_grad_norm: float) -> torch.Tensor:
    """The total gradient norm before clipping (a tensor, no host sync); clips to ``max_grad_norm`` unless it is
    infinite. The divergence guard reads the norm at the optimizer step."""
    return accelerator.clip_grad_norm_(params, max_grad_norm)


def optimizer_step(optimizer, lr_scheduler) -> None:
    """Step the optimizer and the schedule, clear the gradients."""
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
