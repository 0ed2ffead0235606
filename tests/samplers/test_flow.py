"""Flow-matching steps (Flow-GRPO's SDE, CPS, the Euler ODE): hand formulas, exact Gaussian log-probabilities,
and the properties each is built to have."""

import math

import pytest
import torch

from diffrl.samplers.flow import cps_step, euler_step, flow_sde_std, flow_sde_step


def _state(seed=0, shape=(3, 4, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def test_the_sde_mean_is_flow_grpos_drift_and_its_log_prob_the_gaussian_density():
    x, v = _state()
    t, t_next, a = 0.6, 0.5, 0.7
    out = flow_sde_step(v, x, t, t_next, noise_level=a, generator=torch.Generator().manual_seed(1))
    s = a * math.sqrt(t / (1 - t))
    dt = t_next - t
    torch.testing.assert_close(out.mean, x + (v + s ** 2 / (2 * t) * (x + (1 - t) * v)) * dt)
    assert float(out.std.flatten()[0]) == pytest.approx(s * math.sqrt(-dt))
    normal = torch.distributions.Normal(out.mean, out.std.expand_as(out.mean))
    torch.testing.assert_close(out.log_prob, normal.log_prob(out.prev_sample).flatten(1).mean(dim=1))
    again = flow_sde_step(v, x, t, t_next, noise_level=a, prev_sample=out.prev_sample)
    assert torch.equal(again.log_prob, out.log_prob)  # recomputed under the same inputs: ratio exactly 1


def test_without_noise_the_sde_and_cps_are_the_euler_ode_step():
    x, v = _state(1)
    euler = euler_step(v, x, 0.8, 0.6)
    torch.testing.assert_close(euler.prev_sample, x - 0.2 * v)
    sde = flow_sde_step(v, x, 0.8, 0.6, noise_level=0.0)
    cps = cps_step(v, x, 0.8, 0.6, noise_level=0.0)
    torch.testing.assert_close(sde.prev_sample, euler.prev_sample)
    torch.testing.assert_close(cps.prev_sample, euler.prev_sample)
    assert sde.log_prob is None and cps.log_prob is None


def test_cps_keeps_the_schedules_coefficients():
    """On the exact path (x_t = (1 - t) x0 + t eps, v = eps - x0) CPS's next sample is (1 - t') x0 plus noise of
    total variance t'^2: the mean carries sqrt(t'^2 - s^2) eps and the step adds std s."""
    x0, eps = _state(2)
    t, t_next, a = 0.7, 0.4, 0.5
    x_t, v = (1 - t) * x0 + t * eps, eps - x0
    out = cps_step(v, x_t, t, t_next, noise_level=a)
    s = t_next * math.sin(a * math.pi / 2)
    torch.testing.assert_close(out.mean, (1 - t_next) * x0 + math.sqrt(t_next ** 2 - s ** 2) * eps)
    assert float(out.std.flatten()[0]) ** 2 + (t_next ** 2 - s ** 2) == pytest.approx(t_next ** 2)
    torch.testing.assert_close(out.pred_original_sample, x0)


def test_per_sample_times_and_the_first_step_of_the_schedule():
    x, v = _state(3, shape=(2, 1, 2, 2))
    out = flow_sde_step(v, x, torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.4]), noise_level=0.7,
                        generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.shape == x.shape and out.log_prob.shape == (2,)
    with pytest.raises(ValueError, match="t_max"):
        flow_sde_std(torch.tensor([1.0]), 0.7)
    assert float(flow_sde_std(torch.tensor([1.0]), 0.7, t_max=0.96)) == pytest.approx(0.7 * math.sqrt(1 / 0.04))
    with pytest.raises(ValueError, match="noise_level"):
        cps_step(v, x, 0.5, 0.4, noise_level=1.5)
