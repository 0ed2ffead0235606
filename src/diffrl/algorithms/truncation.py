"""Which sampler steps carry gradients in reward backpropagation: AlignProp, DRaFT and ReFL.

Pure functions of the step count and a ``torch.Generator``; no models. Steps are counted in sampling
order, ``0`` (the noisiest, ``t = T``) to ``N - 1`` (the step that lands on ``x_0``). A step "carries
gradients" when its UNet call runs with autograd, so the reward's gradient reaches the weights there;
steps before the first such step run under ``no_grad``.

* AlignProp (Prabhudesai et al. 2023; TRL 0.23's ``rgb_with_grad``): truncated backprop from a fixed
  step index, or from one drawn at random.
* DRaFT-K and DRaFT-LV (Clark et al. 2023, sec. 4): only the last ``K`` steps; ``K = 1`` with ``n``
  re-noised copies of the final sample denoised once more (Algorithm 2, "lower variance").
* ReFL (Xu et al. 2023, ImageReward, sec. 4.2): stop at a random late step and score that step's
  one-step prediction of the clean image; only that step carries gradients.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

__all__ = [
    "STRATEGIES",
    "GradientPlan",
    "draft_k_plan",
    "draft_lv_plan",
    "fixed_plan",
    "plan_gradients",
    "random_plan",
    "refl_plan",
    "suffix_flags",
    "trl_plan",
    "uniform_int",
]

Strategy = Literal["fixed", "random", "draft_k", "draft_lv", "refl"]
STRATEGIES: tuple[str, ...] = ("fixed", "random", "draft_k", "draft_lv", "refl")


class GradientPlan(NamedTuple):
    """What one sampled batch backpropagates through.

    Attributes:
        grad_steps: one flag per step that is run, in sampling order; ``True``: that step's UNet call
            carries gradients. ``len(grad_steps)`` is ``N``, or ``stop_after_step`` for ReFL.
        stop_after_step: ReFL: run only this many steps and score the ``x_0`` prediction of the last one
            (:func:`diffrl.pipelines.chain.run_chain`'s argument); ``None``: run the whole chain.
        renoise_draws: DRaFT-LV: ``n >= 1`` re-noised copies of the chain's ``x_0`` are denoised by the
            last step with gradients (the chain itself runs without); ``0`` for every other strategy.
    """

    grad_steps: list[bool]
    stop_after_step: int | None = None
    renoise_draws: int = 0

    @property
    def num_grad_steps(self) -> int:
        """How many UNet calls per sample carry gradients (DRaFT-LV: ``renoise_draws`` calls at one step)."""
        return self.renoise_draws if self.renoise_draws else sum(self.grad_steps)

    @property
    def first_grad_step(self) -> int:
        """Index of the first step that carries gradients."""
        return self.grad_steps.index(True)


def uniform_int(low: int, high: int, generator: torch.Generator | None) -> int:
    """An integer drawn uniformly from ``[low, high]`` (both ends included, like ``random.randint``) with
    ``generator`` (on any device; ``None``: torch's global generator)."""
    if low > high:
        raise ValueError(f"empty range [{low}, {high}]")
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(low, high + 1, (), generator=generator, device=device))


def suffix_flags(num_steps: int, start: int) -> list[bool]:
    """``[i >= start for i in range(num_steps)]``: the steps from ``start`` on carry gradients."""
    if not 0 <= start < num_steps:
        raise ValueError(f"start={start} must be a step index in [0, {num_steps - 1}] so that at least the "
                         "last step carries gradients.")
    return [i >= start for i in range(num_steps)]


def fixed_plan(num_steps: int, start: int) -> GradientPlan:
    """AlignProp's fixed truncation (TRL ``truncated_backprop_rand=False``): steps ``i >= start``.

    TRL's default ``start = 49`` of 50 steps is K = 1.
    """
    return GradientPlan(suffix_flags(num_steps, start))


def random_plan(num_steps: int, minmax: tuple[int, int], generator: torch.Generator | None) -> GradientPlan:
    """AlignProp's randomised truncation: ``start`` uniform on ``min, ..., max`` (both ends included, as TRL
    0.23's ``random.randint(min, max)``), then steps ``i >= start``; one draw per batch, from ``generator``.

    TRL drew ``random.randint(min, max)`` afresh at every step ``i`` and detached that step's UNet output when
    ``i`` was below the draw, so step ``i`` carried gradients with probability ``(i - min + 1) / (max - min + 1)``.
    One draw per batch gives every step but the last exactly those odds and keeps the graph one contiguous
    chain. A draw of ``start = N`` (possible when ``max = N``, TRL's default 50 of 50 steps) would leave no
    step with gradients, where TRL's loss had none to backpropagate; the last step then carries them, so it
    always does. This is the one AlignProp randomised truncation: the recipe and ``rgb_with_grad`` both use it.
    """
    low, high = minmax
    if not 0 <= low <= high <= num_steps:
        raise ValueError(f"truncated_rand_backprop_minmax={tuple(minmax)} needs 0 <= min <= max <= {num_steps} "
                         "(the number of sampler steps); TRL's default (0, 50) is for 50 steps, e.g. "
                         f"(0, {num_steps}) for {num_steps}.")
    return GradientPlan(suffix_flags(num_steps, min(uniform_int(low, high, generator), num_steps - 1)))


def trl_plan(num_steps: int, *, truncated_backprop: bool = True, truncated_backprop_rand: bool = True,
             truncated_backprop_timestep: int = 49, truncated_rand_backprop_minmax: tuple[int, int] = (0, 50),
             generator: torch.Generator | None = None) -> GradientPlan:
    """The plan of TRL 0.23's ``rgb_with_grad`` arguments: every step (``truncated_backprop=False``),
    :func:`random_plan`, or :func:`fixed_plan` from ``truncated_backprop_timestep`` (a start of ``N`` or more
    keeps only the last step, rather than leaving no step with gradients)."""
    if not truncated_backprop:
        return GradientPlan([True] * num_steps)
    if truncated_backprop_rand:
        return random_plan(num_steps, truncated_rand_backprop_minmax, generator)
    return fixed_plan(num_steps, min(max(truncated_backprop_timestep, 0), num_steps - 1))


def draft_k_plan(num_steps: int, k: int) -> GradientPlan:
    """DRaFT-K: only the last ``k`` steps carry gradients (``k = num_steps`` is full DRaFT)."""
    if not 1 <= k <= num_steps:
        raise ValueError(f"draft_k={k} must be between 1 and the number of sampler steps ({num_steps})")
    return GradientPlan(suffix_flags(num_steps, num_steps - k))


def draft_lv_plan(num_steps: int, draws: int) -> GradientPlan:
    """DRaFT-LV (Clark et al. 2023, Algorithm 2): ``K = 1`` with ``draws`` re-noisings of the final sample.

    The chain runs without gradients to ``x_0``; then ``draws`` times
    ``x_1 = sqrt(abar_1) sg(x_0) + sqrt(1 - abar_1) eps`` (``eps`` fresh, ``t_1`` the last step's timestep)
    is denoised by the last sampler step with gradients, and the rewards of the ``draws`` results average.
    """
    if draws < 1:
        raise ValueError(f"draft_lv_draws={draws} must be at least 1")
    return GradientPlan(suffix_flags(num_steps, num_steps - 1), renoise_draws=draws)


def refl_plan(num_steps: int, step_range: tuple[int, int], generator: torch.Generator | None) -> GradientPlan:
    """ReFL: stop at step ``s`` uniform on ``[min, max]`` (both included); only step ``s`` carries gradients
    and its one-step ``x_0`` prediction is what the reward scores."""
    low, high = step_range
    if not 0 <= low <= high < num_steps:
        raise ValueError(f"ReFL step range [{low}, {high}] needs 0 <= min <= max < {num_steps} (the number of "
                         "sampler steps)")
    stop = uniform_int(low, high, generator)
    return GradientPlan([i == stop for i in range(stop + 1)], stop_after_step=stop + 1)


def plan_gradients(
    strategy: Strategy,
    num_steps: int,
    generator: torch.Generator | None = None,
    *,
    start: int = 49,
    minmax: tuple[int, int] = (0, 50),
    k: int = 1,
    draws: int = 2,
    refl_range: tuple[int, int] = (40, 49),
) -> GradientPlan:
    """The plan of one batch for ``strategy``; only the parameters that strategy uses are read.

    Args:
        strategy: ``"fixed"`` (``start``), ``"random"`` (``minmax``), ``"draft_k"`` (``k``),
            ``"draft_lv"`` (``draws``) or ``"refl"`` (``refl_range``).
        num_steps: sampler steps ``N``.
        generator: the source of the random choices (``"random"`` and ``"refl"``).
    """
    if strategy == "fixed":
        return fixed_plan(num_steps, start)
    if strategy == "random":
        return random_plan(num_steps, minmax, generator)
    if strategy == "draft_k":
        return draft_k_plan(num_steps, k)
    if strategy == "draft_lv":
        return draft_lv_plan(num_steps, draws)
    if strategy == "refl":
        return refl_plan(num_steps, refl_range, generator)
    raise ValueError(f"unknown truncation strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
