"""Time per epoch and peak memory of reward backpropagation, gradient checkpointing on vs off, diffrl vs TRL 0.23.1.

    python bench/alignprop_memory.py                                  # diffrl, checkpointing on and off
    python bench/alignprop_memory.py --trl-python /tmp/trlvenv/bin/python   # ... and TRL 0.23.1 beside it

One fixed tiny configuration: diffrl's tiny random Stable Diffusion (``diffrl.testing.models``; UNet channels
(8, 16), 2-layer CLIP text encoder) sampled at ``--latent`` x ``--latent`` latents, ``--steps`` DDIM steps
(eta 1, guidance 5, so each UNet call runs on 2 x batch), LoRA rank 4, fp32, and by default *every* step
carrying gradients (TRL's fields ``truncated_backprop_rand=False, truncated_backprop_timestep=0``, read the
same way by both implementations; ``--grad-from K`` sets that timestep), so the memory the graph needs grows
with the steps unless checkpointed. Reward: mean brightness. TRL cannot turn checkpointing off from its
config; the bench passes ``gradient_checkpoint`` to its ``rgb_with_grad`` through a subclass of its pipeline.

Each setting runs in a fresh process (with ``OMP_NUM_THREADS`` = ``--threads``): load, build the trainer,
one warm-up epoch, then ``--epochs`` timed epochs (``trainer.step``). Memory is the process's resident set
size: ``peak_rss_mb`` is ``ru_maxrss`` (the high-water mark over the whole process: Python, libraries,
model, graph); ``training_peak_mb`` is that peak minus the resident size once the trainer is built, before
the first epoch (what training added at its peak: activations kept for the backward pass, gradients,
optimizer state). CPU RSS is coarse (the allocator keeps freed pages), so compare settings, not single
megabytes. Results print as a table and are saved as JSON to ``--out`` (default
``bench/results/alignprop_memory/<date>-<commit>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import build_tiny_sd, machine, peak_rss_mb, result_path, rss_mb, save_record

HERE = Path(__file__).resolve().parent


def _brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


def _prompt():
    return "a photo of a cat", {}


def _trainer_kwargs(args) -> dict:
    """The AlignPropConfig fields both implementations read the same way."""
    return dict(num_epochs=1000, save_freq=1000, sample_num_steps=args.steps, train_batch_size=args.batch,
                truncated_backprop_rand=False, truncated_backprop_timestep=args.grad_from, mixed_precision="no",
                sample_guidance_scale=5.0, sample_eta=1.0, train_learning_rate=1e-3, seed=0)


def _diffrl_trainer(args, logdir: str):
    from diffrl import (
        AlignPropConfig,
        AlignPropTrainer,
        DefaultDDPOStableDiffusionPipeline,
    )

    config = AlignPropConfig(logdir=logdir, run_name="bench", gradient_checkpointing=args.checkpointing == "on",
                             **_trainer_kwargs(args))
    pipeline = DefaultDDPOStableDiffusionPipeline(args.model, use_lora=True)
    return AlignPropTrainer(config, _brightness, _prompt, pipeline)


def _trl_trainer(args, logdir: str):
    import warnings

    warnings.filterwarnings("ignore")
    from accelerate import PartialState

    PartialState()  # TRL's pipeline logs through accelerate when the model has no LoRA file, which fails before this
    from trl import (
        AlignPropConfig,
        AlignPropTrainer,
        DefaultDDPOStableDiffusionPipeline,
    )

    checkpointing = args.checkpointing == "on"

    class Pipeline(DefaultDDPOStableDiffusionPipeline):
        def rgb_with_grad(self, *a, **kw):  # TRL's trainer never passes it; its default is True
            kw["gradient_checkpoint"] = checkpointing
            return super().rgb_with_grad(*a, **kw)

    config = AlignPropConfig(logdir=logdir, **_trainer_kwargs(args))
    pipeline = Pipeline(args.model, use_lora=True)
    return AlignPropTrainer(config, _brightness, _prompt, pipeline)


def child(args) -> None:
    """One setting, in this (fresh) process; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as logdir:
        trainer = (_diffrl_trainer if args.impl == "diffrl" else _trl_trainer)(args, logdir)
        rss_before, peak_before = rss_mb(), peak_rss_mb()  # the model and trainer are set up; no epoch yet
        step, times = 0, []
        step = trainer.step(0, step)  # warm-up
        for epoch in range(1, args.epochs + 1):
            start = time.perf_counter()
            step = trainer.step(epoch, step)
            times.append(time.perf_counter() - start)
    peak = peak_rss_mb()
    print(json.dumps({"impl": args.impl, "checkpointing": args.checkpointing, "epoch_s": times,
                      "epoch_s_median": statistics.median(times), "peak_rss_mb": peak,
                      "rss_before_training_mb": rss_before, "peak_before_training_mb": peak_before,
                      "training_peak_mb": peak - rss_before, "torch": torch.__version__}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    parser.add_argument("--grad-from", type=int, default=0,
                        help="first step carrying gradients, truncated_backprop_timestep (default 0: all steps)")
    parser.add_argument("--batch", type=int, default=2, help="train_batch_size (default 2)")
    parser.add_argument("--latent", type=int, default=32, help="latent size; images are twice it (default 32)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per run (default 1)")
    parser.add_argument("--trl-python", default=None,
                        help="a Python with trl==0.23.1 installed (a separate venv); TRL is skipped without it")
    parser.add_argument("--out", default=str(result_path("alignprop_memory")))
    parser.add_argument("--child", choices=["diffrl", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", choices=["on", "off"], default="on", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.impl = args.child
        child(args)
        return 0

    impls = [("diffrl", sys.executable)] + ([("trl", args.trl_python)] if args.trl_python else [])
    results, started = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_sd(Path(tmp) / "tiny-sd", args.latent)
        for impl, python in impls:
            for checkpointing in ("on", "off"):
                cmd = [python, __file__, "--child", impl, "--checkpointing", checkpointing, "--model", str(model),
                       "--steps", str(args.steps), "--grad-from", str(args.grad_from), "--batch", str(args.batch),
                       "--epochs", str(args.epochs), "--threads", str(args.threads)]
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TRANSFORMERS_VERBOSITY="error",
                           HF_HUB_OFFLINE="1")
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    print(f"{impl} checkpointing={checkpointing} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
                    results.append({"impl": impl, "checkpointing": checkpointing, "error": out.stderr[-3000:]})
                    continue
                result = json.loads(out.stdout.strip().splitlines()[-1])
                results.append(result)
                print(f"{impl:7s} checkpointing={checkpointing:3s} epoch {result['epoch_s_median']:7.2f} s   "
                      f"peak RSS {result['peak_rss_mb']:8.1f} MB   training peak {result['training_peak_mb']:8.1f} MB",
                      flush=True)
    record = {"command": " ".join([Path(sys.executable).name, "bench/alignprop_memory.py"] + (argv or sys.argv[1:])),
              "settings": {"model": "diffrl tiny Stable Diffusion", "latent": args.latent, "image": 2 * args.latent,
                           "steps": args.steps,
                           "steps_with_grad": args.steps - args.grad_from, "train_batch_size": args.batch,
                           "guidance_scale": 5.0, "eta": 1.0, "precision": "fp32", "lora_rank": 4,
                           "timed_epochs": args.epochs, "threads": args.threads},
              "machine": machine(), "wall_s": round(time.time() - started, 1), "results": results}
    path = save_record(record, args.out)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
