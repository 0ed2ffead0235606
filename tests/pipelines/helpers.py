import torch


def perturb_trainable(policy, scale: float = 0.05, seed: int = 0) -> None:
    """Give LoRA's zero-initialised B matrices (or the full UNet) a random nudge so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device, p.dtype) * scale)


def recompute_log_probs(policy, trajectory, *, eta, guidance_scale, chunk: int = 1) -> torch.Tensor:
    """``[B, N]`` log-probabilities recomputed step by step, in sub-batches of ``chunk`` samples."""
    B, N = trajectory.log_probs.shape
    out = torch.empty(B, N)
    for i in range(N):
        for s in range(0, B, chunk):
            idx = slice(s, s + chunk)
            cond = trajectory.conditioning.index(idx) if trajectory.conditioning is not None else None
            step = policy.step_log_prob(
                trajectory.latents[idx, i], trajectory.timesteps[idx, i], trajectory.prev_timesteps[idx, i],
                trajectory.latents[idx, i + 1], cond, eta=eta, guidance_scale=guidance_scale,
            )
            out[idx, i] = step.log_prob.detach()
    return out
