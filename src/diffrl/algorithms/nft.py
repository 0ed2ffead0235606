"""DiffusionNFT: negative-aware fine-tuning on the forward process (Zheng et al., ICLR 2026).

The trained policy ``theta`` and the old (sampling) policy define two implicit policies; the positive one is
pulled towards high-reward clean samples and the negative one towards low-reward ones, with the ordinary
denoising objective on freshly noised copies of the final samples. No per-step log-probabilities: any sampler
(deterministic DDIM, DPM-Solver++) can collect the data. Formulas follow the paper and NVlabs/DiffusionNFT
``scripts/train_nft_sd3.py`` (cited per function).

**Why x0 space.** The paper writes the implicit policies for a velocity model,
``v_plus = beta v_theta + (1 - beta) v_old`` and ``v_minus = (1 + beta) v_old - beta v_theta``. For a fixed
``(x_t, t)`` every prediction type gives an estimate of the clean sample that is affine in the network output
``o``: ``x0_hat(o) = c_x x_t + c_o o`` with

* flow matching (``x_t = (1 - t) x0 + t eps``, ``v = eps - x0``): ``x0_hat = x_t - t v``, so ``c_o = -t``;
* epsilon (``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``): ``c_o = -sqrt(1 - abar) / sqrt(abar)``;
* v-prediction: ``c_o = -sqrt(1 - abar)``;  sample prediction: ``c_o = 1``.

An affine map preserves affine combinations whose weights sum to one, and both implicit policies have weights
``(beta, 1 - beta)`` and ``(1 + beta, -beta)``, so ``x0_hat(o_plus) = beta x0_theta + (1 - beta) x0_old`` and
likewise for ``o_minus``: the x0-space policies of :func:`implicit_policies` *are* the paper's, for every
prediction type (as long as ``x0_hat`` is not clipped or thresholded, which is not affine). Let ``o*`` be the
output that recovers ``x0`` exactly (``v* = eps - x0`` for flow); then ``x0_hat(o) - x0 = c_o (o - o*)``, so

``||x0_pm - x0||^2 = c_o^2 ||o_pm - o*||^2``  (for flow: ``t^2 ||v_pm - v||^2``),

and with the adaptive weight ``w = mean|x0_pm - x0| = |c_o| mean|o_pm - o*|`` the weighted loss of
:func:`adaptive_mse` satisfies ``L_x0 = |c_o| L_o`` (for flow: ``L_x0 = t L_v``) wherever the ``1e-5`` floor is
inactive. The x0-space loss is therefore the paper's output-space loss reweighted per sample by ``|c_o|``,
the same weighting NVlabs' code applies (it evaluates the loss on ``x0 = x_t - t v``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, MutableMapping, NamedTuple

import torch

from diffrl.algorithms.grpo import StdMode, add_kl_term, check_kl_term, group_advantages

__all__ = [
    "EMA_SCHEDULES",
    "EMASchedule",
    "NFTStats",
    "adaptive_mse",
    "advantages_to_optimality",
    "ema_update",
    "implicit_policies",
    "nft_loss",
    "nft_optimality",
    "prediction_kl",
    "sample_train_timesteps",
]

_WEIGHT_FLOOR = 1e-5  # NVlabs/DiffusionNFT: ``weight.clip(min=0.00001)``


def _non_batch(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def advantages_to_optimality(advantages: torch.Tensor, adv_clip_max: float = 5.0) -> torch.Tensor:
    """``r = clip(clip(A, +-A_max) / A_max / 2 + 0.5, 0, 1)``: the optimality probability in ``[0, 1]``.

    NVlabs/DiffusionNFT ``train_nft_sd3.py`` (``normalized_advantages_clip``), ``A_max = adv_clip_max = 5``.
    ``A = 0`` maps to ``r = 0.5`` (both branches weighted equally); ``A >= A_max`` to ``r = 1``.
    """
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max={adv_clip_max} must be > 0.")
    a = advantages.clamp(-adv_clip_max, adv_clip_max)
    return (a / adv_clip_max / 2.0 + 0.5).clamp(0.0, 1.0)


def nft_optimality(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    adv_clip_max: float = 5.0,
    std: StdMode = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Rewards ``[N]`` to optimality probabilities ``r`` ``[N]``: group advantages, clipped, mapped to ``[0, 1]``.

    The advantages are :func:`diffrl.algorithms.grpo.group_advantages` (eps ``1e-4`` as the reference's
    per-prompt tracker); for several rewards compute advantages with ``multi_reward_advantages`` and call
    :func:`advantages_to_optimality`. (NVlabs' multi-reward runs average the rewards *before* normalising.)
    """
    adv = group_advantages(rewards, group_ids, std=std, eps=eps, clip=adv_clip_max)
    return advantages_to_optimality(adv, adv_clip_max)


def implicit_policies(
    theta: torch.Tensor, old: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(beta theta + (1 - beta) old, (1 + beta) old - beta theta)``: the positive and negative implicit policies.

    DiffusionNFT's ``v_plus``/``v_minus`` (``positive_prediction``, ``implicit_negative_prediction`` in the
    reference code). ``old`` is detached; gradients flow through ``theta`` only. Valid in any space in which
    the prediction is affine in the network output (see the module docstring): pass ``x0_theta, x0_old``.
    """
    if beta <= 0:
        raise ValueError(f"nft beta={beta} must be > 0 (the paper uses 1.0, and 0.1 for OCR).")
    old = old.detach()
    return beta * theta + (1.0 - beta) * old, (1.0 + beta) * old - beta * theta


def adaptive_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((pred - target)^2) / sg(max(mean|pred - target|, 1e-5))`` per sample, ``[B]``.

    DiffusionNFT's adaptive weighting (NVlabs ``train_nft_sd3.py``: ``weight_factor`` computed in float64
    under ``no_grad`` and clipped at ``1e-5``). Means run over every non-batch dimension. Computed in at
    least float32.
    """
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    err = prediction.to(dtype) - target.to(dtype)
    with torch.no_grad():
        weight = err.detach().double().abs().mean(dim=_non_batch(err)).clamp(min=_WEIGHT_FLOOR).to(dtype)
    return (err**2).mean(dim=_non_batch(err)) / weight


def prediction_kl(output: torch.Tensor, output_ref: torch.Tensor) -> torch.Tensor:
    """``mean((output - output_ref)^2)`` over the non-batch dimensions, ``[B]``: NFT's KL to the reference.

    NVlabs' ``kl_div_loss`` is this squared distance between the trained and the reference model's raw
    predictions (velocities there; pass ``eps_theta, eps_ref`` for UNets), weighted by ``kl_coef`` (1e-4).
    """
    dtype = torch.promote_types(output.dtype, torch.float32)
    return ((output.to(dtype) - output_ref.detach().to(dtype)) ** 2).mean(dim=_non_batch(output))


class NFTStats(NamedTuple):
    """Scalar diagnostics of one NFT loss evaluation (detached).

    Attributes:
        policy_loss: ``policy_scale * mean(r L_plus + (1 - r) L_minus) / beta``; log as ``loss/policy``.
        positive_loss: ``mean(L_plus)``.
        negative_loss: ``mean(L_minus)``.
        kl_ref: ``mean(kl)`` (0 when none was given); log as ``stats/kl_ref``.
        old_deviation: ``mean((x0_theta - x0_old)^2)``, how far the trained policy has moved from the old one.
    """

    policy_loss: torch.Tensor
    positive_loss: torch.Tensor
    negative_loss: torch.Tensor
    kl_ref: torch.Tensor
    old_deviation: torch.Tensor


def nft_loss(
    x0_theta: torch.Tensor,
    x0_old: torch.Tensor,
    x0: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    *,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    policy_scale: float = 1.0,
) -> tuple[torch.Tensor, NFTStats]:
    """The DiffusionNFT loss in x0 space, ``policy_scale * mean(r L_plus + (1 - r) L_minus) / beta + kl_coef * mean(kl)``.

    Args:
        x0_theta: ``[B, *S]`` the trained model's clean-sample estimate at ``(x_t, t)``, with gradients.
        x0_old: ``[B, *S]`` the old (EMA) policy's estimate at the same ``(x_t, t)`` (detached here).
        x0: ``[B, *S]`` the clean samples the noise was added to.
        r: ``[B]`` optimality probabilities (:func:`nft_optimality`).
        beta: the implicit-policy strength (> 0).
        kl: ``[B]`` distance to the reference (:func:`prediction_kl`), or ``None``.
        kl_coef: weight of ``mean(kl)``.
        policy_scale: a constant factor on the policy term. NVlabs' code multiplies it by ``adv_clip_max``
            (``policy_loss = (ori_policy_loss * adv_clip_max).mean()``, i.e. 5); pass that to reproduce its
            scale relative to the KL term. The default 1 is the paper's objective.

    ``L_pm = adaptive_mse(x0_pm, x0)`` with ``x0_pm`` from :func:`implicit_policies`.
    """
    if x0_theta.shape != x0_old.shape or x0_theta.shape != x0.shape:
        raise ValueError(
            f"x0_theta {tuple(x0_theta.shape)}, x0_old {tuple(x0_old.shape)} and x0 {tuple(x0.shape)} must match."
        )
    if r.shape != x0.shape[:1]:
        raise ValueError(f"r has shape {tuple(r.shape)}; expected one value per sample, ({x0.shape[0]},).")
    check_kl_term(kl, kl_coef, r.shape, source="prediction_kl")
    x0_plus, x0_minus = implicit_policies(x0_theta, x0_old, beta)
    target = x0.detach()
    positive, negative = adaptive_mse(x0_plus, target), adaptive_mse(x0_minus, target)
    r = r.detach().to(positive.dtype)
    policy = policy_scale * (r * positive + (1.0 - r) * negative).mean() / beta
    loss, kl_mean = add_kl_term(policy, kl, kl_coef)
    with torch.no_grad():
        deviation = ((x0_theta.detach().float() - x0_old.detach().float()) ** 2).mean()
    stats = NFTStats(
        policy_loss=policy.detach(),
        positive_loss=positive.detach().mean(),
        negative_loss=negative.detach().mean(),
        kl_ref=kl_mean.detach(),
        old_deviation=deviation,
    )
    return loss, stats


@dataclass(frozen=True)
class EMASchedule:
    """The old policy's EMA decay as a function of the optimizer step: 0 before ``flat_steps``, then
    ``min(rate * (step - flat_steps), max_decay)`` (NVlabs ``return_decay``: ``flat``, ``uprate``, ``uphold``).

    ``decay = 0`` makes the old policy a copy of the current weights; the decay rises as training proceeds,
    so the old policy lags further behind.
    """

    rate: float
    max_decay: float
    flat_steps: int = 0

    def __post_init__(self) -> None:
        if self.rate < 0 or not 0 <= self.max_decay < 1 or self.flat_steps < 0:
            raise ValueError(
                f"EMASchedule(rate={self.rate}, max_decay={self.max_decay}, flat_steps={self.flat_steps}): "
                "need rate >= 0, 0 <= max_decay < 1 and flat_steps >= 0."
            )

    def decay(self, step: int) -> float:
        """The decay to use after ``step`` optimizer steps."""
        if step < 0:
            raise ValueError(f"step={step} must be >= 0.")
        if step < self.flat_steps:
            return 0.0
        return min(self.rate * (step - self.flat_steps), self.max_decay)


# NVlabs/DiffusionNFT ``decay_type`` 0, 1 (the default of its configs) and 2 (its OCR config).
EMA_SCHEDULES: Mapping[str, EMASchedule] = {
    "none": EMASchedule(rate=0.0, max_decay=0.0),
    "linear": EMASchedule(rate=0.001, max_decay=0.5),
    "warm_start": EMASchedule(rate=0.0075, max_decay=0.999, flat_steps=75),
}


@torch.no_grad()
def ema_update(old: MutableMapping[str, torch.Tensor], new: Mapping[str, torch.Tensor], decay: float) -> None:
    """In place, for every key: ``old <- decay * old + (1 - decay) * new`` (NVlabs: once per epoch).

    ``new`` is cast to each ``old`` tensor's dtype and device (the old policy may live on the CPU).
    """
    if not 0 <= decay <= 1:
        raise ValueError(f"EMA decay={decay} must be in [0, 1].")
    if set(old) != set(new):
        missing, extra = sorted(set(old) - set(new)), sorted(set(new) - set(old))
        raise ValueError(f"EMA keys differ: missing from new {missing}, not in old {extra}.")
    for key, target in old.items():
        source = new[key]
        if source.shape != target.shape:
            raise ValueError(f"EMA tensor {key!r}: old {tuple(target.shape)} vs new {tuple(source.shape)}.")
        target.lerp_(source.detach().to(device=target.device, dtype=target.dtype), 1.0 - decay)


def sample_train_timesteps(
    timesteps: torch.Tensor,
    batch_size: int,
    *,
    fraction: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per sample, ``K = int(N * fraction)`` distinct timesteps of the sampling schedule, in random order.

    NVlabs' ``timestep_fraction``: each sample trains on the first ``K`` of a random permutation of the
    schedule's ``N`` timesteps (uniform, without replacement). ``timesteps``: ``[N]``; returns ``[B, K]``.
    ``generator=None`` draws from the global RNG.
    """
    if timesteps.ndim != 1 or timesteps.numel() == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D schedule; got shape {tuple(timesteps.shape)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    if not 0 < fraction <= 1:
        raise ValueError(f"timestep_fraction={fraction} must be in (0, 1].")
    n = timesteps.numel()
    k = int(n * fraction)
    if k < 1:
        raise ValueError(
            f"timestep_fraction={fraction} of {n} sampling steps selects no timestep; use at least {1 / n:.3g}."
        )
    device = generator.device if generator is not None else timesteps.device
    order = torch.rand(batch_size, n, generator=generator, device=device).argsort(dim=1)[:, :k]
    return timesteps[order.to(timesteps.device)]
