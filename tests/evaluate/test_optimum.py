"""The KL-regularised optimum estimated from base samples, checked where it is known in closed form."""

import math

import torch

from diffrl.evaluate.optimum import kl_regularised_optimum, step_kl
from diffrl.metrics import diversity


def test_two_outcomes_give_the_closed_form_tilt():
    """Base: half the samples score 1 (one image), half 0 (another). pi* puts p = e^(1/b) / (1 + e^(1/b)) on the
    first; its reward is p, its KL from the base p log 2p + (1 - p) log 2(1 - p)."""
    n = 1000
    rewards = torch.tensor([1.0] * (n // 2) + [0.0] * (n // 2))
    features = torch.cat([torch.ones(n // 2, 4), torch.zeros(n // 2, 4)])
    for beta in (0.25, 1.0, 4.0):
        p = math.exp(1 / beta) / (1 + math.exp(1 / beta))
        (point,) = kl_regularised_optimum(rewards, features, [beta], indicator=rewards > 0.5)
        assert point.reward == pytest_approx(p) and point.share == pytest_approx(p)
        assert point.kl == pytest_approx(p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))
        # two independent draws differ (distance 1) with probability 2 p (1 - p), up to the i != j correction
        assert point.diversity == pytest_approx(2 * p * (1 - p), rel=1e-2)
        assert point.ess == pytest_approx(n / (2 * (p * p + (1 - p) ** 2)), rel=1e-6)


def test_a_huge_beta_is_the_base_model_and_a_tiny_one_its_best_sample():
    torch.manual_seed(0)
    features = torch.rand(200, 12)
    rewards = torch.randn(200)
    base, best = kl_regularised_optimum(rewards, features, [1e6, 1e-4])
    assert base.reward == pytest_approx(float(rewards.double().mean()), abs=1e-4) and base.kl < 1e-6
    assert base.diversity == pytest_approx(diversity(features), rel=1e-4)
    assert best.reward == pytest_approx(float(rewards.max())) and best.ess == pytest_approx(1.0)
    assert best.kl == pytest_approx(math.log(200), rel=1e-6)


def test_step_kl_sums_the_gaussian_kl_over_the_image():
    mean = torch.zeros(2, 3, 4, 4)
    ref = mean.clone()
    ref[1] += 0.5
    kl = step_kl(mean, ref, 0.25)
    assert kl.tolist() == [0.0, pytest_approx(48 * 0.25 / (2 * 0.0625))]


def pytest_approx(*args, **kwargs):
    import pytest

    return pytest.approx(*args, **kwargs)
