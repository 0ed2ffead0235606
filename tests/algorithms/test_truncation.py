from collections import Counter

import pytest
import torch

from diffrl.algorithms.truncation import (
    GradientPlan,
    draft_k_plan,
    draft_lv_plan,
    fixed_plan,
    plan_gradients,
    random_plan,
    refl_plan,
    suffix_flags,
    trl_plan,
    uniform_int,
)

F, T = False, True


def test_fixed_truncation_is_trl_s_rule_i_at_least_start():
    assert fixed_plan(5, 3).grad_steps == [F, F, F, T, T]
    assert fixed_plan(50, 49).grad_steps == [F] * 49 + [T]  # TRL's default: K = 1
    assert fixed_plan(4, 0).grad_steps == [T] * 4  # full backprop
    with pytest.raises(ValueError, match="start=4"):
        fixed_plan(4, 4)  # no step would carry gradients


def test_draft_k_keeps_the_last_k_steps():
    assert draft_k_plan(5, 1).grad_steps == [F, F, F, F, T]
    assert draft_k_plan(5, 2).grad_steps == [F, F, F, T, T]
    assert draft_k_plan(3, 3).grad_steps == [T, T, T]  # DRaFT: the whole chain
    for bad in (0, 6):
        with pytest.raises(ValueError, match="draft_k"):
            draft_k_plan(5, bad)


def test_draft_lv_is_k_equals_one_with_renoised_draws():
    plan = draft_lv_plan(4, 3)
    assert plan.grad_steps == [F, F, F, T]
    assert plan.renoise_draws == 3 and plan.stop_after_step is None
    assert plan.num_grad_steps == 3 and plan.first_grad_step == 3
    with pytest.raises(ValueError, match="draft_lv_draws"):
        draft_lv_plan(4, 0)


def test_random_truncation_is_one_suffix_with_trl_s_inclusive_range_and_per_step_odds():
    gen = torch.Generator().manual_seed(0)
    starts = Counter()
    n = 5000
    for _ in range(n):
        plan = random_plan(4, (0, 4), gen)
        k = plan.first_grad_step
        assert plan.grad_steps == suffix_flags(4, k)  # contiguous: every step from k on
        starts[k] += 1
    # random.randint(0, 4) includes 4; a draw of 4 (no step) keeps the last step, so start 3 has twice the odds.
    assert set(starts) == {0, 1, 2, 3}
    for k in range(3):
        assert starts[k] / n == pytest.approx(1 / 5, abs=0.03)
    assert starts[3] / n == pytest.approx(2 / 5, abs=0.03)
    # TRL's per-step odds (i - min + 1) / (max - min + 1): step 1 carries gradients in 2 of 5 batches.
    assert (starts[0] + starts[1]) / n == pytest.approx(2 / 5, abs=0.03)
    assert {random_plan(4, (2, 2), gen).first_grad_step for _ in range(5)} == {2}  # min == max is one step
    with pytest.raises(ValueError, match="truncated_rand_backprop_minmax"):
        random_plan(4, (0, 5), gen)
    with pytest.raises(ValueError, match="truncated_rand_backprop_minmax"):
        random_plan(4, (3, 2), gen)


def test_trl_plan_maps_rgb_with_grad_arguments():
    gen = torch.Generator().manual_seed(0)
    assert trl_plan(3, truncated_backprop=False).grad_steps == [T, T, T]
    assert trl_plan(5, truncated_backprop_rand=False, truncated_backprop_timestep=3) == fixed_plan(5, 3)
    assert trl_plan(5, truncated_backprop_rand=False, truncated_backprop_timestep=49) == fixed_plan(5, 4)
    a = trl_plan(10, truncated_rand_backprop_minmax=(2, 9), generator=torch.Generator().manual_seed(3))
    assert a == random_plan(10, (2, 9), torch.Generator().manual_seed(3))  # one plan code for both callers
    assert trl_plan(50, generator=gen).first_grad_step in range(50)  # TRL's defaults: (0, 50) of 50 steps


def test_random_choices_come_from_the_generator_only():
    def draws(seed):
        gen = torch.Generator().manual_seed(seed)
        return [random_plan(10, (2, 9), gen).first_grad_step for _ in range(20)]

    torch.manual_seed(123)
    a = draws(7)
    torch.manual_seed(456)  # the global RNG does not matter
    assert draws(7) == a
    assert draws(8) != a
    assert all(2 <= k <= 9 for k in a)


def test_refl_stops_in_range_with_gradients_at_the_stop_step_only():
    gen = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(300):
        plan = refl_plan(10, (6, 8), gen)
        stop = plan.stop_after_step - 1
        seen.add(stop)
        assert plan.grad_steps == [i == stop for i in range(stop + 1)]
        assert plan.num_grad_steps == 1 and plan.first_grad_step == stop
    assert seen == {6, 7, 8}
    assert refl_plan(4, (3, 3), gen) == GradientPlan([F, F, F, T], stop_after_step=4)
    for bad in ((3, 2), (0, 4), (-1, 2)):
        with pytest.raises(ValueError, match="ReFL"):
            refl_plan(4, bad, gen)


def test_plan_gradients_dispatches_and_reads_only_its_parameters():
    gen = torch.Generator().manual_seed(0)
    assert plan_gradients("fixed", 4, start=2, k=99) == fixed_plan(4, 2)
    assert plan_gradients("draft_k", 4, k=2, start=99) == draft_k_plan(4, 2)
    assert plan_gradients("draft_lv", 4, draws=2) == draft_lv_plan(4, 2)
    assert plan_gradients("random", 4, gen, minmax=(1, 3)).first_grad_step in (1, 2, 3)
    assert plan_gradients("refl", 4, gen, refl_range=(1, 2)).stop_after_step in (2, 3)
    with pytest.raises(ValueError, match="unknown truncation strategy 'drafts'"):
        plan_gradients("drafts", 4)


def test_uniform_int_includes_both_ends():
    gen = torch.Generator().manual_seed(0)
    assert {uniform_int(3, 5, gen) for _ in range(200)} == {3, 4, 5}
    assert uniform_int(2, 2, gen) == 2
    with pytest.raises(ValueError, match="empty range"):
        uniform_int(3, 2, gen)
