import math

import numpy as np
import pytest
import torch

from diffrl.algorithms import (
    PerPromptStatTracker,
    batch_advantages,
    denoising_loss,
    ppo_clip_loss,
    reinforce_loss,
    rwr_sparse_weights,
    rwr_weights,
)


def test_ppo_clip_loss_hand_computed():
    # ratios e^0.2 ~ 1.2214 (clipped to 1.1 for a positive advantage) and e^-0.2 ~ 0.8187 (for a negative one
    # the unclipped -A r = 0.8187 vs clipped -A*0.9 = 0.9: the max picks the clipped 0.9).
    logp = torch.tensor([0.2, -0.2])
    old = torch.zeros(2)
    adv = torch.tensor([1.0, -1.0])
    loss, stats = ppo_clip_loss(logp, old, adv, clip_range=0.1)
    expected = (max(-1 * math.exp(0.2), -1 * 1.1) + max(1 * math.exp(-0.2), 1 * 0.9)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats.clipfrac.item() == 1.0
    assert stats.approx_kl.item() == pytest.approx(0.5 * 0.04, abs=1e-7)
    assert stats.ratio.item() == pytest.approx((math.exp(0.2) + math.exp(-0.2)) / 2, abs=1e-6)


def test_ppo_gradient_vanishes_when_clipped_and_matches_reinforce_at_ratio_one():
    logp = torch.zeros(3, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, stats = ppo_clip_loss(logp, torch.zeros(3), adv, clip_range=1e-4)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 3)  # at ratio 1: d/dlogp of -A r is -A r = -A
    assert stats.ratio.item() == 1.0 and stats.clipfrac.item() == 0.0
    logp2 = torch.full((1,), 0.5, requires_grad=True)
    loss2, _ = ppo_clip_loss(logp2, torch.zeros(1), torch.ones(1), clip_range=0.1)
    loss2.backward()
    assert logp2.grad.item() == 0.0


def test_reinforce_loss():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    loss, _ = reinforce_loss(logp, logp.detach(), torch.tensor([2.0, -1.0]))
    assert loss.item() == pytest.approx(-((2 * -1) + (-1 * -2)) / 2)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-1.0, 0.5]))


def test_rwr_weights():
    w = rwr_weights(torch.tensor([0.0, math.log(3.0)]), temperature=1.0)
    torch.testing.assert_close(w, torch.tensor([0.5, 1.5]))
    sparse = rwr_sparse_weights(torch.tensor([1.0, 2.0, 3.0, 4.0]), percentile=50)
    torch.testing.assert_close(sparse, torch.tensor([0.0, 0.0, 2.0, 2.0]))
    with pytest.raises(ValueError, match="temperature=0"):
        rwr_weights(torch.ones(2), 0)


def test_denoising_loss():
    out = torch.zeros(2, 1, 2, 2)
    target = torch.ones(2, 1, 2, 2)
    target[1] *= 2
    assert denoising_loss(out, target, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)
    assert denoising_loss(out, target, torch.tensor([0.0, 1.0])).item() == pytest.approx(2.0)


def test_batch_advantages():
    adv = batch_advantages(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(adv, np.array([-1.0, 0.0, 1.0]) / np.std([1, 2, 3]), rtol=1e-6)


def test_per_prompt_tracker_uses_batch_stats_until_min_count():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    first = tracker.update(["a", "a", "b", "b"], np.array([1.0, 3.0, 10.0, 14.0]))
    np.testing.assert_allclose(first, batch_advantages(np.array([1.0, 3.0, 10.0, 14.0])))
    second = tracker.update(["a", "b"], np.array([2.0, 12.0]))  # both prompts now have 3 rewards
    np.testing.assert_allclose(second, [0.0, 0.0], atol=1e-6)
    tracker.update(["a", "a"], np.array([100.0, 100.0]))  # buffer keeps only the newest 4
    assert list(tracker.history["a"]) == [3.0, 2.0, 100.0, 100.0]
    restored = PerPromptStatTracker(1, 1)
    restored.load_state_dict(tracker.state_dict())
    np.testing.assert_allclose(restored.update(["a"], np.array([5.0])), tracker.update(["a"], np.array([5.0])))
    with pytest.raises(ValueError, match="min_count=5"):
        PerPromptStatTracker(buffer_size=4, min_count=5)
