"""GRPO for diffusion: group-relative advantages, the reference KL and the clipped loss.

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, sec. 4.1) as carried to diffusion
sampling by Flow-GRPO (Liu et al. 2025; yifan123/flow_grpo ``scripts/train_sd3.py``), DanceGRPO (Xue et al.
2025) and MixGRPO (Li et al. 2025):
every prompt is sampled ``G`` times, each sample's reward is normalised by its own group's statistics, and
every trained denoising step is a PPO-clipped policy-gradient term plus a closed-form KL to the reference.

Pure tensor functions; the trainer gathers rewards across processes and calls these.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, NamedTuple

import torch

from diffrl.algorithms.ddpo import ppo_clip_loss
from diffrl.samplers.gaussian import DeterministicStepError, Reduction, reduce_per_sample

StdMode = Literal["group", "global"]
STD_MODES: tuple[str, ...] = ("group", "global")

__all__ = [
    "GRPOStats",
    "STD_MODES",
    "add_kl_term",
    "check_kl_term",
    "gathered_group_advantages",
    "gaussian_mean_kl",
    "group_advantages",
    "grpo_loss",
    "multi_reward_advantages",
    "process_slice",
]


def _check_group_inputs(rewards: torch.Tensor, group_ids: torch.Tensor) -> None:
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N]; got shape {tuple(rewards.shape)}.")
    if group_ids.shape != rewards.shape:
        raise ValueError(
            f"group_ids has shape {tuple(group_ids.shape)} but rewards has {tuple(rewards.shape)}: "
            "give one group id per reward."
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor; got dtype {group_ids.dtype}.")
    if rewards.numel() == 0:
        raise ValueError("rewards is empty: at least one sample is needed to form a group.")


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    std: StdMode = "group",
    eps: float = 1e-4,
    clip: float | None = None,
    unbiased: bool = False,
) -> torch.Tensor:
    """Group-relative advantages ``A_i = (r_i - mean_g) / (std_g + eps)`` (GRPO; Flow-GRPO's ``PerPromptStatTracker``).

    Args:
        rewards: ``[N]`` one scalar reward per sample.
        group_ids: ``[N]`` integers; samples with equal ids form one group (the images of one prompt).
            Ids need not be contiguous or sorted.
        std: ``"group"`` divides by each group's own standard deviation; ``"global"`` by the standard
            deviation of all ``N`` rewards (Flow-GRPO's ``global_std`` option). The mean is always the group's.
        eps: added to the standard deviation. ``1e-4`` is Flow-GRPO's value (its ``PerPromptStatTracker``);
            DanceGRPO uses ``1e-8``.
        clip: if given, advantages are clamped to ``[-clip, clip]`` (``train_adv_clip_max``; 5 in both references).
        unbiased: use the ``N - 1`` (Bessel) standard deviation, as DanceGRPO's ``torch.std`` does; the default
            ``N`` one is Flow-GRPO's ``np.std``.

    Returns:
        ``[N]`` advantages, float32 (float64 if ``rewards`` is float64).

    A group of size 1 has no spread to compare against: its advantage is defined as exactly 0 (the sample
    contributes no policy gradient), whichever ``std`` mode. A group whose rewards are all equal also gets 0.
    """
    _check_group_inputs(rewards, group_ids)
    if std not in STD_MODES:
        raise ValueError(f"std={std!r} is not supported; use 'group' or 'global'.")
    if eps < 0:
        raise ValueError(f"eps={eps} must be >= 0.")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip={clip} must be > 0 (or None for no clipping).")
    out_dtype = torch.promote_types(rewards.dtype, torch.float32)
    r = rewards.detach().to(torch.float64)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    num_groups = counts.numel()
    n = counts.to(torch.float64)
    sums = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, inverse, r)
    mean = (sums / n)[inverse]
    centred = r - mean
    if std == "group":
        sq = torch.zeros_like(sums).index_add_(0, inverse, centred**2)
        dof = (n - 1).clamp(min=1) if unbiased else n
        spread = (sq / dof).sqrt()[inverse]
    else:
        spread = r.std(correction=1 if unbiased and r.numel() > 1 else 0).expand_as(r)
    adv = centred / (spread + eps) if eps > 0 else torch.where(spread > 0, centred / spread, 0.0)
    adv = torch.where(counts[inverse] > 1, adv, torch.zeros_like(adv))
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.to(out_dtype)


def multi_reward_advantages(
    rewards: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    group_ids: torch.Tensor,
    *,
    clip: float | None = None,
    **normalisation: Any,
) -> torch.Tensor:
    """MixGRPO's multi-reward advantage: ``A = sum_k w_k * A_k`` with each ``A_k`` group-normalised on its own.

    Normalising each reward separately keeps a reward with a large scale from drowning the others (MixGRPO's
    multi-reward training). ``clip`` applies to the weighted sum (the advantage that enters the loss);
    the per-reward advantages are not clipped. ``rewards`` and ``weights`` must have the same keys.
    ``normalisation``: ``std``, ``eps`` and ``unbiased`` of :func:`group_advantages`, for every reward.
    """
    if set(rewards) != set(weights):
        raise ValueError(
            f"rewards has keys {sorted(rewards)} but weights has {sorted(weights)}: give one weight per reward."
        )
    if not rewards:
        raise ValueError("rewards is empty: give at least one named reward.")
    total = None
    for name in sorted(rewards):
        part = float(weights[name]) * group_advantages(rewards[name], group_ids, **normalisation)
        total = part if total is None else total + part
    assert total is not None
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"clip={clip} must be > 0 (or None for no clipping).")
        total = total.clamp(-clip, clip)
    return total


def process_slice(values: torch.Tensor, process_index: int, num_processes: int) -> torch.Tensor:
    """This process's rows of a tensor gathered from all processes (``all_gather`` order: rank 0 first).

    ``values``: ``[num_processes * n, ...]``; returns rows ``[process_index * n, (process_index + 1) * n)``.
    """
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"process_index={process_index} must be in [0, num_processes={num_processes}).")
    if values.shape[0] % num_processes:
        raise ValueError(
            f"{values.shape[0]} gathered rows do not split evenly over {num_processes} processes: "
            "every process must contribute the same number of samples."
        )
    n = values.shape[0] // num_processes
    return values[process_index * n : (process_index + 1) * n]


def gathered_group_advantages(
    gathered_rewards: torch.Tensor | Mapping[str, torch.Tensor],
    gathered_group_ids: torch.Tensor,
    process_index: int,
    num_processes: int,
    *,
    weights: Mapping[str, float] | None = None,
    **normalisation: Any,
) -> torch.Tensor:
    """Advantages of this process's samples, computed from every process's rewards.

    Args:
        gathered_rewards: ``[P * n]`` rewards of all ``P`` processes concatenated in rank order (what
            ``accelerator.gather`` returns), or a mapping of such tensors with ``weights`` (multi-reward).
        gathered_group_ids: ``[P * n]`` group ids in the same order. Ids must be global: two different
            prompts must never share an id, even when they were sampled on different processes.
        normalisation: ``std``, ``eps``, ``clip`` and ``unbiased``, as for :func:`group_advantages` (and
            :func:`multi_reward_advantages`, whose ``clip`` applies to the weighted sum).

    Returns:
        ``[n]`` advantages of rows ``[process_index * n, (process_index + 1) * n)``.

    Every process computes the statistics of the whole gathered batch, so a group split between processes
    is normalised with the same mean and std on each of them, as if it had been sampled on one.
    """
    if isinstance(gathered_rewards, Mapping):
        if weights is None:
            raise ValueError("several named rewards were given without weights: pass weights={name: w, ...}.")
        adv = multi_reward_advantages(gathered_rewards, weights, gathered_group_ids, **normalisation)
    else:
        adv = group_advantages(gathered_rewards, gathered_group_ids, **normalisation)
    return process_slice(adv, process_index, num_processes)


def gaussian_mean_kl(
    mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor, reduction: Reduction = "mean"
) -> torch.Tensor:
    """``KL(N(mean, std^2) || N(mean_ref, std^2)) = (mean - mean_ref)^2 / (2 std^2)`` per element, reduced.

    The closed form of the KL of two Gaussians with the same standard deviation, as the reference-KL term
    of Flow-GRPO (its ``kl_loss`` in ``train_sd3.py``) and DanceGRPO. The reduction over the non-batch dimensions
    matches :func:`diffrl.samplers.gaussian.gaussian_log_prob`: ``"mean"`` (the references' choice, the
    per-dimension KL) or ``"sum"`` (the KL of the whole sample).

    Args:
        mean, mean_ref: ``[B, *S]`` the transition means under the trained and the reference policy.
        std: broadcastable to ``[B, *S]`` (``[B, 1, ..., 1]`` from a sampler's ``StepOutput.std``), > 0.

    Returns:
        ``[B]``, in float32 (or float64) whatever the input dtype.
    """
    if bool((std <= 0).any()):
        raise DeterministicStepError(
            "reference KL requested for a deterministic step (standard deviation 0): the KL of two point "
            "masses is undefined. Only steps sampled with eta > 0 (the SDE window) carry a KL term."
        )
    dtype = torch.promote_types(mean.dtype, torch.float32)
    diff = mean.to(dtype) - mean_ref.to(dtype)
    return reduce_per_sample(diff**2 / (2 * std.to(dtype) ** 2), reduction)


class GRPOStats(NamedTuple):
    """Scalar diagnostics of one GRPO loss evaluation (detached).

    Attributes:
        approx_kl: ``0.5 * mean((logp - logp_old)^2)`` (to the sampling policy), as for DDPO.
        clipfrac: fraction of ratios outside ``[1 - eps, 1 + eps]``.
        ratio: mean importance ratio.
        policy_loss: the clipped surrogate alone.
        kl_ref: ``mean(kl)`` to the reference policy (0 when no KL was given); log as ``stats/kl_ref``.
    """

    approx_kl: torch.Tensor
    clipfrac: torch.Tensor
    ratio: torch.Tensor
    policy_loss: torch.Tensor
    kl_ref: torch.Tensor


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, GRPOStats]:
    """One step's GRPO loss: ``ppo_clip_loss + kl_coef * mean(kl)`` (Flow-GRPO's ``policy_loss + beta * kl_loss``).

    Args:
        log_prob, old_log_prob, advantages: ``[B]``, as for :func:`diffrl.algorithms.ddpo.ppo_clip_loss`
            (advantages already clipped, e.g. by :func:`group_advantages`).
        clip_range: PPO's ``eps``.
        kl: ``[B]`` per-sample KL to the reference policy at this step (:func:`gaussian_mean_kl`), with
            gradients; ``None`` for no KL term.
        kl_coef: its weight ``beta`` (Flow-GRPO: 0.04 GenEval/OCR, 0.01 PickScore, 0 in the Fast variants).
    """
    check_kl_term(kl, kl_coef, log_prob.shape, source="gaussian_mean_kl")
    policy, base = ppo_clip_loss(log_prob, old_log_prob, advantages, clip_range)
    loss, kl_mean = add_kl_term(policy, kl, kl_coef)
    stats = GRPOStats(
        approx_kl=base.approx_kl,
        clipfrac=base.clipfrac,
        ratio=base.ratio,
        policy_loss=policy.detach(),
        kl_ref=kl_mean.detach(),
    )
    return loss, stats


def check_kl_term(kl: torch.Tensor | None, kl_coef: float, shape: torch.Size, *, source: str) -> None:
    """Validate a loss's reference-KL inputs: ``kl_coef >= 0``, a ``kl`` when ``kl_coef > 0`` (from the function
    named ``source``), and one value per sample (``shape``, ``[B]``)."""
    if kl_coef < 0:
        raise ValueError(f"kl_coef={kl_coef} must be >= 0.")
    if kl_coef > 0 and kl is None:
        raise ValueError(f"kl_coef={kl_coef} > 0 but no kl was given: pass kl={source}(...).")
    if kl is not None and kl.shape != shape:
        raise ValueError(f"kl has shape {tuple(kl.shape)}; expected one value per sample, {tuple(shape)}.")


def add_kl_term(policy: torch.Tensor, kl: torch.Tensor | None, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(policy + kl_coef * mean(kl), mean(kl))``; without ``kl``, ``(policy, 0)``."""
    if kl is None:
        return policy, torch.zeros((), dtype=policy.dtype, device=policy.device)
    kl_mean = kl.mean()
    return policy + kl_coef * kl_mean, kl_mean
