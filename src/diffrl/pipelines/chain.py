"""The denoising loop shared by every policy: sample a trajectory, optionally with gradients."""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import torch
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from diffrl.pipelines.types import DiffusionPolicy, SampleResult, Trajectory


def run_chain(
    policy: DiffusionPolicy,
    x_T: torch.Tensor,
    conditioning: Any,
    prompts: list[str],
    *,
    num_inference_steps: int = 50,
    guidance_scale: float,
    eta: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None,
    grad_steps: Sequence[bool] | None = None,
    gradient_checkpointing: bool = False,
    stop_after_step: int | None = None,
    progress: bool = False,
    sde_steps: Sequence[bool] | None = None,
    record_means: bool = False,
) -> SampleResult:
    """Run the reverse chain from ``x_T`` and record it.

    Args:
        grad_steps: one flag per step; the UNet call of a step whose flag is set runs with autograd on
            (gradients reach the weights there), the others under ``no_grad``. ``None``: no gradients at all.
            Reward backpropagation picks the flags (truncated backprop, DRaFT-K, ...).
        gradient_checkpointing: recompute each gradient step's UNet activations in the backward pass
            instead of storing them, so memory does not grow with the number of steps in the graph.
        stop_after_step: run only this many steps and return the images decoded from that last step's
            ``x_0`` prediction (ReFL); ``None`` runs the whole chain and decodes ``x_0``.
        sde_steps: one flag per step; flagged steps are stochastic (the sampler's step with ``eta``, exact
            log-probability), the others the deterministic DDIM step (``eta = 0``, log-probability recorded
            as 0): the stochastic window of MixGRPO / Flow-GRPO-Fast. ``None``: every step as the sampler says.
        record_means: keep each transition's mean (``Trajectory.means``, the size of the latents again): what an
            exact KL trust region around the sampling policy needs.
    """
    schedule = policy.schedule
    device = x_T.device
    timesteps = schedule.timesteps(num_inference_steps, device=device)
    n_steps = len(timesteps) if stop_after_step is None else stop_after_step
    if not 1 <= n_steps <= len(timesteps):
        raise ValueError(f"stop_after_step={stop_after_step} must be between 1 and {len(timesteps)}.")
    flags = [False] * n_steps if grad_steps is None else [bool(f) for f in grad_steps[:n_steps]]
    if len(flags) < n_steps:
        raise ValueError(f"grad_steps has {len(grad_steps or [])} flags for {n_steps} steps.")
    compute_log_prob = schedule.is_stochastic(eta)
    can_draw = schedule.stochastic_steps(len(timesteps), eta)[:n_steps]  # e.g. CPS's last step has no noise
    stochastic = can_draw if sde_steps is None else [bool(f) and d for f, d in zip(sde_steps[:n_steps], can_draw)]
    if sde_steps is not None and len(sde_steps) < n_steps:
        raise ValueError(f"sde_steps has {len(sde_steps or [])} flags for {n_steps} steps; give one per step.")
    if sde_steps is not None and any(sde_steps[:n_steps]) and not compute_log_prob:
        raise ValueError(f"sde_steps marks stochastic steps but eta={eta}: a DDIM step with eta = 0 has no noise "
                         "and no log-probability. Use eta > 0 (1.0 is DDPM's variance) with sde_steps.")
    batch = x_T.shape[0]
    x = x_T
    latents, log_probs, ts, prev_ts, means = [x_T.detach()], [], [], [], []
    step = None
    for i in tqdm(range(n_steps), desc="sampling", disable=not progress, leave=False):
        t = timesteps[i].expand(batch)
        t_prev = schedule.prev_timesteps(t, num_inference_steps)
        with torch.set_grad_enabled(flags[i]):
            if flags[i] and gradient_checkpointing:
                out = checkpoint(policy.predict, x, t, conditioning, guidance_scale, use_reentrant=False)
            else:
                out = policy.predict(x, t, conditioning, guidance_scale)
            if stochastic[i]:
                step = schedule.step(out, x, t, t_prev, eta=eta, generator=generator, compute_log_prob=True)
            elif sde_steps is not None:
                step = schedule.deterministic_step(out, x, t, t_prev)
            else:  # eta = 0 throughout: exactly the pre-``sde_steps`` path
                step = schedule.step(out, x, t, t_prev, eta=eta, generator=generator, compute_log_prob=False)
        x = step.prev_sample
        latents.append(x.detach())
        if record_means:
            means.append(step.mean.detach().to(x.dtype))
        log_probs.append(step.log_prob.detach() if step.log_prob is not None else torch.zeros(batch, device=device))
        ts.append(t)
        prev_ts.append(t_prev)
    final = step.pred_original_sample if stop_after_step is not None else x
    any_grad = any(flags)
    with torch.set_grad_enabled(any_grad):
        images = policy.decode(final)
    trajectory = Trajectory(
        images=images.detach(),
        latents=torch.stack(latents, dim=1),
        timesteps=torch.stack(ts, dim=1),
        prev_timesteps=torch.stack(prev_ts, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        conditioning=conditioning,
        prompts=prompts,
        stochastic=torch.tensor(stochastic, device=device).expand(batch, n_steps).clone(),
        means=torch.stack(means, dim=1) if record_means else None,
    )
    return SampleResult(trajectory, images if any_grad else None)


# What a policy's ``sample(**options)`` passes on to :func:`run_chain`; ``guidance_scale`` and ``generator`` are
# ``sample``'s own (it also uses them for the text states and the initial noise).
CHAIN_OPTIONS: frozenset[str] = frozenset(
    name for name, p in inspect.signature(run_chain).parameters.items() if p.kind is p.KEYWORD_ONLY
) - {"guidance_scale", "generator"}


def chain_options(options: Mapping[str, Any], *, ignore_unknown: bool = False) -> dict[str, Any]:
    """The entries of ``options`` that :func:`run_chain` takes (:data:`CHAIN_OPTIONS`); any other keyword is a
    ``TypeError`` naming it (raised before any sampling work), or dropped with ``ignore_unknown``."""
    unknown = sorted(set(options) - CHAIN_OPTIONS)
    if unknown and not ignore_unknown:
        raise TypeError(f"sample() got unexpected keyword argument(s) {unknown}; besides its own, it takes the "
                        f"sampling options {sorted(CHAIN_OPTIONS)}.")
    return {k: v for k, v in options.items() if k in CHAIN_OPTIONS}
