"""Generation on fixed seeds: every image has its own generator, seeded by its seed alone.

Image ``(prompt, seed)`` draws its initial noise ``x_T`` and then the noise of every denoising step from
``image_generator(seed)`` (:mod:`diffrl.seeding`, the rule training-time evaluation uses too), so it is the same whatever the batch size or the position in the batch, and two
models with the same latent shape start from the same ``x_T`` and receive the same per-step noise.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffrl.evaluate.inputs import EvaluationError, PromptItem
from diffrl.seeding import sample_on_seeds


@dataclass(frozen=True)
class SampleSettings:
    """How to sample: DDIM steps, classifier-free guidance (ignored by unconditional models), eta, batch size, and
    the image size in pixels (``None``: the model's native size; not for unconditional DDPMs)."""

    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    eta: float = 1.0
    batch_size: int = 8
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise EvaluationError(f"--steps={self.num_inference_steps} must be at least 1")
        if self.batch_size < 1:
            raise EvaluationError(f"--batch-size={self.batch_size} must be at least 1")
        if not 0.0 <= self.eta <= 1.0:
            raise EvaluationError(f"--eta={self.eta} must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like)")
        for flag, value in (("--height", self.height), ("--width", self.width)):
            if value is not None and value < 1:
                raise EvaluationError(f"{flag}={value} must be a positive size in pixels (a multiple of 8 for SD/SDXL)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SampleJob(NamedTuple):
    """One image to make: the prompt (by index into the evaluation's prompts) and the seed of its noise."""

    prompt_index: int
    prompt: PromptItem
    seed: int


class SampleBatch(NamedTuple):
    """A generated batch.

    Attributes:
        images: ``[B, 3, H, W]`` float32 in ``[0, 1]``, on the policy's device.
        jobs: the ``B`` jobs, in row order.
        noise_shape: ``(C, h, w)`` of the initial noise (latents for Stable Diffusion, pixels for a DDPM).
    """

    images: torch.Tensor
    jobs: list[SampleJob]
    noise_shape: tuple[int, ...]


def make_jobs(prompts: Sequence[PromptItem], seeds: Sequence[int]) -> list[SampleJob]:
    """Every (prompt, seed) pair, prompt by prompt."""
    if not seeds:
        raise EvaluationError("no seeds; give --seeds (e.g. --seeds 0 1 2 3) or --num-seeds N")
    if len(set(seeds)) != len(seeds):
        raise EvaluationError(f"--seeds {list(seeds)} repeats a seed; a repeated seed repeats the same image")
    if any(s < 0 for s in seeds):
        raise EvaluationError(f"--seeds {list(seeds)} has a negative seed; seeds are integers >= 0")
    return [SampleJob(i, p, int(s)) for i, p in enumerate(prompts) for s in seeds]


def check_prompts_fit(policy: Any, prompts: Sequence[PromptItem], model: str) -> None:
    """An unconditional model ignores prompts: several distinct prompts would only repeat the same images."""
    if not getattr(policy, "is_conditional", True) and len({p.text for p in prompts}) > 1:
        raise EvaluationError(f"model '{model}' is unconditional (it ignores prompts), but {len(prompts)} prompts were "
                              "given; drop --prompts/--prompt-source/--heldout-* and use more --seeds for more samples")


def check_size_fits(policy: Any, settings: SampleSettings) -> None:
    """``--height``/``--width`` need a latent model (a DDPM's size is fixed) and a multiple of its VAE factor."""
    given = [(flag, v) for flag, v in (("--height", settings.height), ("--width", settings.width)) if v is not None]
    if given and getattr(policy, "kind", None) == "ddpm":
        raise EvaluationError(f"{given[0][0]}={given[0][1]}: the model is an unconditional DDPM, whose image size is "
                              "fixed by its UNet; drop --height/--width")
    factor = getattr(policy, "vae_scale_factor", 1)
    for flag, value in given:
        if value % factor:
            raise EvaluationError(f"{flag}={value} is not a multiple of {factor} (the model's VAE factor); use "
                                  f"{flag} {max(factor, -(-value // factor) * factor)}")


def generate(policy: Any, jobs: Sequence[SampleJob], settings: SampleSettings,
             progress: str | None = None) -> Iterator[SampleBatch]:
    """Sample ``jobs`` in batches of ``settings.batch_size`` by :func:`diffrl.seeding.sample_on_seeds`'s rule (each
    image from its own seed); yields each batch as soon as it is made."""
    jobs = list(jobs)
    check_size_fits(policy, settings)
    for batch in sample_on_seeds(policy, [job.prompt.text for job in jobs], [job.seed for job in jobs],
                                 num_inference_steps=settings.num_inference_steps,
                                 guidance_scale=settings.guidance_scale, eta=settings.eta,
                                 batch_size=settings.batch_size, progress=progress, height=settings.height,
                                 width=settings.width):
        yield SampleBatch(batch.images, [jobs[i] for i in batch.indices], batch.noise_shape)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B, H, W, 3]`` uint8."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def thumbnails(images: torch.Tensor, max_side: int) -> torch.Tensor:
    """``[B, 3, H, W]`` in ``[0, 1]`` -> uint8, downscaled (antialiased) so the longer side is at most ``max_side``."""
    x = images.detach().float().cpu()
    h, w = x.shape[-2:]
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        x = F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear",
                          antialias=True, align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def sample_filename(job: SampleJob) -> str:
    """``p003_s7.png``: the prompt's index and the seed."""
    return f"p{job.prompt_index:03d}_s{job.seed}.png"


def safe_name(name: str) -> str:
    """A folder-safe version of a model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def write_images(batch: SampleBatch, folder: Path) -> list[str]:
    """Save each image of ``batch`` as a PNG in ``folder``; returns the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for array, job in zip(to_uint8(batch.images), batch.jobs):
        name = sample_filename(job)
        Image.fromarray(array).save(folder / name)
        names.append(name)
    return names


def write_index(path: Path, model: dict[str, Any], settings: SampleSettings, jobs: Sequence[SampleJob],
                files: Sequence[str]) -> Path:
    """``index.json``: the model, the settings, and for every image its prompt, split, seed and file."""
    index = {
        "model": model,
        "settings": settings.to_dict(),
        "samples": [{"prompt": job.prompt.text, "prompt_index": job.prompt_index, "split": job.prompt.split,
                     "seed": job.seed, "file": file} for job, file in zip(jobs, files)],
    }
    path.write_text(json.dumps(index, indent=2, default=str) + "\n", encoding="utf-8")
    return path
