"""The stochastic-step window (MixGRPO, Flow-GRPO-Fast): flagged steps are SDE steps with exact log-probs."""

import pytest
import torch

from diffrl.pipelines import DDPMPolicy, StableDiffusionPolicy

from .helpers import perturb_trainable, recompute_log_probs

F, T = False, True
WINDOW = [F, T, T, F, F]


@pytest.fixture(scope="module")
def sd(tiny_sd_path):
    policy = StableDiffusionPolicy.from_pretrained(tiny_sd_path)
    perturb_trainable(policy)
    return policy


def test_window_steps_have_ratio_one_and_the_rest_are_deterministic(sd):
    with torch.no_grad():
        traj = sd.sample(["a cat", "a dog"], num_inference_steps=5, guidance_scale=4.0, eta=1.0, sde_steps=WINDOW,
                         generator=torch.Generator().manual_seed(0)).trajectory
        recomputed = recompute_log_probs(sd, traj, eta=1.0, guidance_scale=4.0, chunk=2)
    assert traj.stochastic.shape == (2, 5) and traj.stochastic.dtype == torch.bool
    assert traj.stochastic.tolist() == [WINDOW, WINDOW]
    window = traj.stochastic
    assert torch.equal(traj.log_probs[~window], torch.zeros(6))
    ratio = torch.exp(recomputed[window] - traj.log_probs[window])
    assert (ratio - 1).abs().max() < 1e-5
    # A step outside the window is the eta = 0 DDIM step: it recomputes exactly from its start.
    with torch.no_grad():
        for i in (0, 3, 4):
            out = sd.predict(traj.latents[:, i], traj.timesteps[:, i], traj.conditioning, 4.0)
            step = sd.schedule.deterministic_step(out, traj.latents[:, i], traj.timesteps[:, i],
                                                  traj.prev_timesteps[:, i])
            torch.testing.assert_close(step.prev_sample, traj.latents[:, i + 1], rtol=0, atol=1e-6)


def test_without_a_window_every_step_is_stochastic(sd, tiny_ddpm_path):
    traj = sd.sample(["a"], num_inference_steps=3, generator=torch.Generator().manual_seed(0)).trajectory
    assert traj.stochastic.all() and (traj.log_probs != 0).all()
    deterministic = sd.sample(["a"], num_inference_steps=3, eta=0.0).trajectory
    assert not deterministic.stochastic.any()
    ddpm = DDPMPolicy.from_pretrained(tiny_ddpm_path, sampler="ddpm")
    with torch.no_grad():
        traj = ddpm.sample(batch_size=2, num_inference_steps=4, sde_steps=[F, F, T, T],
                           generator=torch.Generator().manual_seed(1)).trajectory
        recomputed = recompute_log_probs(ddpm, traj, eta=1.0, guidance_scale=1.0, chunk=2)
    assert torch.equal(traj.log_probs[:, :2], torch.zeros(2, 2))
    assert (torch.exp(recomputed[:, 2:] - traj.log_probs[:, 2:]) - 1).abs().max() < 1e-5


def test_the_unet_runs_with_autograd_only_at_grad_steps(sd):
    seen = []
    hook = sd.trainable_module.register_forward_hook(lambda m, i, o: seen.append(torch.is_grad_enabled()))
    try:
        result = sd.sample(["a"], num_inference_steps=5, guidance_scale=1.0, sde_steps=WINDOW, grad_steps=WINDOW,
                           generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert seen == WINDOW
    assert torch.equal(result.trajectory.stochastic[0], torch.tensor(WINDOW))


def test_bad_windows_are_clear_errors(sd):
    with pytest.raises(ValueError, match="sde_steps has 2 flags for 5 steps"):
        sd.sample(["a"], num_inference_steps=5, sde_steps=[T, T])
    with pytest.raises(ValueError, match="eta=0.0"):
        sd.sample(["a"], num_inference_steps=5, eta=0.0, sde_steps=WINDOW)
