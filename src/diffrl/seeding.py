"""Where every random draw of diffrl comes from: generators seeded from integers, independent of global RNGs.

One rule for fixed-seed sampling, used by training-time evaluation (``eval_every``, the quickstart's figures) and
by ``diffrl sample`` / ``diffrl evaluate``: image ``i`` of an evaluation draws its initial noise ``x_T`` and the
noise of every denoising step from ``generator_for(seed_i)``. An image therefore depends on its seed alone, not
on the batch size or its position in the batch, and two models with the same latent shape see the same noise.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Sequence

import torch
from tqdm.auto import tqdm

__all__ = ["SeededBatch", "generator_for", "sample_on_seeds"]


#: ``generator_for(seed, epoch, SAMPLE_NOISE, ...)``: the noise of one training sample (its initial noise and every
#: step's), a stream no other draw of a run uses (shuffles, truncation plans and windows have their own parts).
SAMPLE_NOISE = 13


def generator_for(*parts: int) -> torch.Generator:
    """A CPU generator seeded from ``parts`` (seed, epoch, process, batch, ...), independent of the global RNG,
    so a resumed run draws the same noise as an uninterrupted one."""
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class SeededBatch(NamedTuple):
    """One batch of :func:`sample_on_seeds`.

    Attributes:
        images: ``[B, 3, H, W]`` float32 in ``[0, 1]`` on the policy's device.
        indices: positions of these ``B`` images in the requested ``prompts``/``seeds``.
        noise_shape: ``(C, h, w)`` of the initial noise (latents for Stable Diffusion, pixels for a DDPM).
    """

    images: torch.Tensor
    indices: list[int]
    noise_shape: tuple[int, ...]


@torch.no_grad()
def sample_on_seeds(policy: Any, prompts: Sequence[str], seeds: Sequence[int], *, num_inference_steps: int,
                    guidance_scale: float, eta: float, batch_size: int, progress: str | None = None,
                    height: int | None = None, width: int | None = None) -> Iterator[SeededBatch]:
    """Sample image ``i`` for ``prompts[i]`` from ``generator_for(seeds[i])`` alone, ``batch_size`` at a time.
    ``progress``: a progress bar (on stderr) with this label, counting images; ``height``/``width``: the image
    size in pixels (``None``: the model's native size)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per image")
    bar = tqdm(total=len(prompts), desc=progress, unit="img", leave=False, disable=progress is None)
    size = {"height": height, "width": width} if height is not None or width is not None else {}
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        generators = [generator_for(seeds[i]) for i in idx]
        x_T = policy.initial_noise(len(idx), generators, **size)
        out = policy.sample([prompts[i] for i in idx], batch_size=len(idx), num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, eta=eta, generator=generators, latents=x_T, **size)
        bar.update(len(idx))
        yield SeededBatch(out.trajectory.images.float(), idx, tuple(x_T.shape[1:]))
    bar.close()
