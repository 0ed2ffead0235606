import math

import pytest
import torch

from diffrl.algorithms import (
    gathered_group_advantages,
    gaussian_mean_kl,
    group_advantages,
    grpo_loss,
    multi_reward_advantages,
    ppo_clip_loss,
    process_slice,
    sde_window,
    window_start,
)
from diffrl.samplers import DeterministicStepError

EPS = 1e-4


def test_group_advantages_hand_computed():
    # group 0: rewards 1, 2, 3 -> mean 2, population std sqrt(2/3); group 1: equal rewards; group 2: singleton.
    rewards = torch.tensor([1.0, 10.0, 2.0, 10.0, 3.0, 5.0])
    groups = torch.tensor([7, 4, 7, 4, 7, 9])  # non-contiguous, unsorted ids
    adv = group_advantages(rewards, groups)
    s = math.sqrt(2 / 3)
    expected = torch.tensor([-1 / (s + EPS), 0.0, 0.0, 0.0, 1 / (s + EPS), 0.0])
    torch.testing.assert_close(adv, expected)
    # DanceGRPO's unbiased std: std of (1, 2, 3) is 1.
    unbiased = group_advantages(rewards, groups, unbiased=True, eps=1e-8)
    torch.testing.assert_close(unbiased[[0, 2, 4]], torch.tensor([-1.0, 0.0, 1.0]))


def test_group_advantages_global_std_and_clip():
    rewards = torch.tensor([0.0, 2.0, 10.0, 14.0])
    groups = torch.tensor([0, 0, 1, 1])
    # global mean 6.5, deviations -6.5 -4.5 3.5 7.5 -> variance (42.25 + 20.25 + 12.25 + 56.25) / 4 = 32.75
    g = math.sqrt(32.75)
    adv = group_advantages(rewards, groups, std="global")
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (g + EPS))
    # clip: group (0, 0, 0, 1): mean 0.25, std sqrt(3)/4 -> the last advantage is 0.75 / 0.433 = 1.732 > 1.5
    clipped = group_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), torch.zeros(4, dtype=torch.long), clip=1.5)
    s = math.sqrt(3) / 4
    torch.testing.assert_close(clipped, torch.tensor([-0.25 / (s + EPS)] * 3 + [1.5]))
    # a singleton group has advantage 0 under the global std too
    single = group_advantages(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([0, 0, 1]), std="global")
    assert single[2].item() == 0.0


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="std='prompt'"):
        group_advantages(torch.ones(2), torch.zeros(2, dtype=torch.long), std="prompt")
    with pytest.raises(ValueError, match="integer"):
        group_advantages(torch.ones(2), torch.zeros(2))
    with pytest.raises(ValueError, match="one group id per reward"):
        group_advantages(torch.ones(3), torch.zeros(2, dtype=torch.long))


def test_multi_reward_advantages_normalise_each_reward_then_weight():
    groups = torch.tensor([0, 0, 1, 1])
    rewards = {"aesthetic": torch.tensor([1.0, 3.0, 0.0, 0.0]), "clip": torch.tensor([100.0, 300.0, 5.0, 7.0])}
    adv = multi_reward_advantages(rewards, {"aesthetic": 1.0, "clip": 0.5}, groups)
    # a two-sample group (a, b) normalises to -+d / (d + eps) with d = |b - a| / 2; equal rewards to 0
    u, c = 1 / (1 + EPS), 100 / (100 + EPS)
    torch.testing.assert_close(adv, torch.tensor([-u - 0.5 * c, u + 0.5 * c, -0.5 * u, 0.5 * u]))
    # summing the raw rewards first would let the large-scale reward dominate: not what this computes
    naive = group_advantages(rewards["aesthetic"] + 0.5 * rewards["clip"], groups)
    assert not torch.allclose(naive, adv)
    clipped = multi_reward_advantages(rewards, {"aesthetic": 1.0, "clip": 0.5}, groups, clip=1.0)
    assert clipped.abs().max().item() == 1.0
    with pytest.raises(ValueError, match="one weight per reward"):
        multi_reward_advantages(rewards, {"aesthetic": 1.0}, groups)


def test_group_split_across_two_processes_gets_the_whole_groups_statistics():
    # process 0 sampled (g0, g0, g1), process 1 sampled (g1, g1, g2): group 1 is split between them.
    gathered_rewards = torch.tensor([1.0, 3.0, 0.0, 3.0, 6.0, 4.0])
    gathered_groups = torch.tensor([0, 0, 1, 1, 1, 2])
    local = [gathered_group_advantages(gathered_rewards, gathered_groups, p, 2) for p in (0, 1)]
    # group 1 = (0, 3, 6): mean 3, population std sqrt(6)
    s1 = math.sqrt(6)
    u = 1 / (1 + EPS)
    torch.testing.assert_close(local[0], torch.tensor([-u, u, -3 / (s1 + EPS)]))
    torch.testing.assert_close(local[1], torch.tensor([0.0, 3 / (s1 + EPS), 0.0]))
    torch.testing.assert_close(torch.cat(local), group_advantages(gathered_rewards, gathered_groups))
    # had each process normalised only its own rows, the split group would get other statistics
    alone = group_advantages(gathered_rewards[3:], gathered_groups[3:])
    assert not torch.allclose(alone, local[1])
    # multi-reward through the same path
    multi = gathered_group_advantages({"a": gathered_rewards}, gathered_groups, 1, 2, weights={"a": 2.0})
    torch.testing.assert_close(multi, 2 * local[1])
    with pytest.raises(ValueError, match="split evenly"):
        process_slice(torch.zeros(5), 0, 2)


def test_gaussian_mean_kl_zero_for_equal_means_and_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 2, 4, 4, generator=gen)
    ref = torch.randn(3, 2, 4, 4, generator=gen)
    std = torch.tensor([0.5, 1.0, 2.0]).reshape(3, 1, 1, 1)
    assert torch.count_nonzero(gaussian_mean_kl(mean, mean, std)) == 0
    elementwise = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std.expand_as(mean)), torch.distributions.Normal(ref, std.expand_as(ref))
    )
    torch.testing.assert_close(gaussian_mean_kl(mean, ref, std), elementwise.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(gaussian_mean_kl(mean, ref, std, reduction="sum"), elementwise.sum(dim=(1, 2, 3)))
    half = gaussian_mean_kl(mean.half(), ref.half(), std.half())
    assert half.dtype == torch.float32
    with pytest.raises(DeterministicStepError):
        gaussian_mean_kl(mean, ref, torch.zeros(3, 1, 1, 1))


def test_grpo_loss_adds_the_kl_term_to_ppo():
    logp = torch.tensor([0.05, -0.02, 0.0], requires_grad=True)
    old = torch.zeros(3)
    adv = torch.tensor([1.0, -0.5, 2.0])
    kl = torch.tensor([0.1, 0.3, 0.2], requires_grad=True)
    ppo, ppo_stats = ppo_clip_loss(logp, old, adv, 0.1)
    plain, plain_stats = grpo_loss(logp, old, adv, 0.1)
    torch.testing.assert_close(plain, ppo)
    assert plain_stats.kl_ref.item() == 0.0 and plain_stats.ratio == ppo_stats.ratio
    loss, stats = grpo_loss(logp, old, adv, 0.1, kl=kl, kl_coef=0.04)
    torch.testing.assert_close(loss, ppo + 0.04 * 0.2)
    torch.testing.assert_close(stats.kl_ref, torch.tensor(0.2))
    torch.testing.assert_close(stats.policy_loss, ppo.detach())
    loss.backward()
    torch.testing.assert_close(kl.grad, torch.full((3,), 0.04 / 3))
    with pytest.raises(ValueError, match="no kl was given"):
        grpo_loss(logp, old, adv, 0.1, kl_coef=0.1)


def _is_one_run(mask: list[bool], size: int) -> bool:
    on = [i for i, m in enumerate(mask) if m]
    return len(on) == size and on == list(range(on[0], on[0] + size))


def test_sde_window_fixed_and_sliding_with_wrap():
    assert sde_window(5, 2, schedule="fixed", epoch=9, start=1) == [False, True, True, False, False]
    # 5 steps, size 2 -> 4 positions; start 1, shift every 2 epochs: s = (1 + e // 2) % 4
    starts = [window_start(5, 2, schedule="sliding", epoch=e, start=1, shift_every=2) for e in range(10)]
    assert starts == [1, 1, 2, 2, 3, 3, 0, 0, 1, 1]
    for e in range(10):
        mask = sde_window(5, 2, schedule="sliding", epoch=e, start=1, shift_every=2)
        assert len(mask) == 5 and _is_one_run(mask, 2) and mask.index(True) == starts[e]
    assert sde_window(3, 3, schedule="sliding", epoch=7) == [True, True, True]
    with pytest.raises(ValueError, match="sde_window_start=4"):
        sde_window(5, 2, schedule="fixed", epoch=0, start=4)
    with pytest.raises(ValueError, match="sde_window_size=6"):
        sde_window(5, 6, schedule="fixed", epoch=0)


def test_sde_window_random_is_reproducible_and_always_one_run():
    def draws(seed: int) -> list[list[bool]]:
        gen = torch.Generator().manual_seed(seed)
        return [sde_window(10, 4, schedule="random", epoch=e, generator=gen) for e in range(40)]

    first, again = draws(3), draws(3)
    assert first == again
    assert all(_is_one_run(m, 4) for m in first)
    assert {m.index(True) for m in first} == set(range(7))  # every one of the 7 positions occurs in 40 draws
    assert draws(4) != first
    with pytest.raises(ValueError, match="needs a torch.Generator"):
        sde_window(10, 4, schedule="random", epoch=0)
