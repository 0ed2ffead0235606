"""Where every random draw of diffrl comes from: generators seeded from integers, independent of global RNGs.

One rule for fixed-seed sampling, used by training-time evaluation (``eval_every``, the quickstart's figures) and
by ``diffrl sample`` / ``diffrl evaluate``: image ``i`` of an evaluation draws its initial noise ``x_T`` and the
noise of every denoising step from ``image_generator(seed_i)``. An image therefore depends on its seed alone, not
on the batch size or its position in the batch, and two models with the same latent shape see the same noise.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from typing import Any, Iterator, NamedTuple, Sequence

import torch
from tqdm.auto import tqdm

__all__ = ["SeededBatch", "Stream", "generator_for", "image_generator", "sample_on_seeds", "stream_seed"]


class Stream(str, enum.Enum):
    """Every random stream of a training run. A draw names its stream and the integers that locate it
    (``generator_for(Stream.SAMPLE_NOISE, seed, epoch, process, batch, sample)``); two different streams, or the
    same stream at two different places, never share a seed (:func:`stream_seed`)."""

    SAMPLE_NOISE = "sample_noise"
    """One training sample's noise, initial and per step: ``(seed, epoch, process, batch, sample)`` for DDPO and
    AlignProp, ``(seed, epoch, sample id)`` for GRPO's initial noise, ``(seed, epoch, process, batch)`` for a
    DiffusionNFT sample batch (one generator drives its batch)."""
    GROUP_NOISE = "group_noise"
    """GRPO's shared initial noise of a group (``group_shared_noise``): ``(seed, epoch, group id)``."""
    STEP_NOISE = "step_noise"
    """GRPO's per-step noise of one sample: ``(seed, epoch, sample id)``."""
    SHUFFLE = "shuffle"
    """An inner epoch's shuffle of samples and timesteps, and the training-time draws that follow it (RWR's and
    DiffusionNFT's noise and timesteps): ``(seed, epoch, inner epoch, process)``."""
    PLAN = "plan"
    """A reward-backpropagation micro-batch's truncation plan: ``(seed, epoch, process, micro-batch)``."""
    WINDOW = "window"
    """GRPO's stochastic-step window of an epoch (``sde_window_schedule: random``): ``(seed, epoch)``."""
    PROMPTS = "prompts"
    """A built-in prompt source's draw (:class:`diffrl.prompts.PromptSource`): ``(source seed, position)``,
    process ``r`` of ``n`` taking positions ``r, r + n, ...``."""
    TRL_SAMPLES = "trl_samples"
    """TRL's ``DDPOTrainer._generate_samples`` called directly: ``(seed, global step, batch)``."""


def stream_seed(stream: Stream | str, *parts: int) -> int:
    """The 63-bit seed of ``stream`` at ``parts``: BLAKE2b of the stream's name and the parts, each encoded as a
    fixed-width signed 64-bit integer after the count of parts. The encoding is injective (tuples of different
    lengths or with leading zeros encode differently: ``(0, 1)`` and ``(0, 0, 1)`` do not collide, unlike a
    polynomial fold ``seed * K + p``), so two draws share a seed only through a 2^-63 hash collision."""
    name = Stream(stream).value.encode()
    payload = struct.pack(f"<H{len(name)}sI{len(parts)}q", len(name), name, len(parts), *(int(p) for p in parts))
    digest = hashlib.blake2b(payload, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator_for(stream: Stream | str, *parts: int) -> torch.Generator:
    """A CPU generator for ``stream`` at ``parts`` (seed, epoch, process, batch, ...), independent of the global
    RNG, so a resumed run draws the same numbers as an uninterrupted one."""
    return torch.Generator().manual_seed(stream_seed(stream, *parts))


def image_generator(seed: int) -> torch.Generator:
    """The evaluation rule: image ``i`` draws its initial noise and every step's noise from
    ``torch.Generator().manual_seed(seed_i)``, reproducible with plain torch."""
    return torch.Generator().manual_seed(int(seed))


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
    """Sample image ``i`` for ``prompts[i]`` from ``image_generator(seeds[i])`` alone, ``batch_size`` at a time.
    ``progress``: a progress bar (on stderr) with this label, counting images; ``height``/``width``: the image
    size in pixels (``None``: the model's native size)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per image")
    bar = tqdm(total=len(prompts), desc=progress, unit="img", leave=False, disable=progress is None)
    size = {"height": height, "width": width} if height is not None or width is not None else {}
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        generators = [image_generator(seeds[i]) for i in idx]
        x_T = policy.initial_noise(len(idx), generators, **size)
        out = policy.sample([prompts[i] for i in idx], batch_size=len(idx), num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, eta=eta, generator=generators, latents=x_T, **size)
        bar.update(len(idx))
        yield SeededBatch(out.trajectory.images.float(), idx, tuple(x_T.shape[1:]))
    bar.close()
