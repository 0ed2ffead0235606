"""GRPO-window and NFT rows of the GPU benchmark: time diffrl's trainers where they exist, else say so.

    python bench/gpu_rows.py --workload grpo --model DIR --device cuda --mixed-precision bf16 ...   # one JSON line

The child of ``bench/gpu.py`` for the two trainers of issues 13 and 14 (``from diffrl import GRPOConfig,
GRPOTrainer, NFTConfig, NFTTrainer``). While diffrl lacks them it prints ``{"available": false, "note": ...}`` and
exits 0. When they exist it runs like ``bench/throughput.py``'s child: LoRA rank 4, the model folder of the
benchmark, one warm-up epoch, then ``--epochs`` timed epochs of ``trainer.step``, the same JPEG-compressibility
reward. Settings (the issues' config keys): GRPO samples ``group_size`` images for each of ``prompts_per_epoch``
prompts, DDIM with eta 1 only inside a window of ``sde_window_size`` steps (trained there), guidance 5,
``kl_coef`` > 0; NFT samples the same groups with deterministic DDIM (eta 0) at guidance 1 and trains on the
forward process (``nft_beta`` 1; NFT's epoch is ``sample_num_batches_per_epoch`` batches of one group). If a key is refused the row records the error, to be fixed here.

Model FLOPs are counted from the UNet calls that actually ran in the timed epochs, not from a formula: a forward
hook on the UNet adds up the latent rows of each call, split into calls that built an autograd graph (each a
forward + backward) and calls that did not (forward only); ``bench/gpu.py`` multiplies them by the per-row FLOPs
of ``bench/gpu_flops.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from throughput import TimedReward, _common, _page_in, jpeg_compressibility, prompt

WORKLOADS = ("grpo", "nft")
NAMES = {"grpo": ("GRPOConfig", "GRPOTrainer", "issue 13"), "nft": ("NFTConfig", "NFTTrainer", "issue 14")}


def availability(workload: str) -> tuple[bool, str]:
    """Whether diffrl exports the workload's config and trainer; the note says why not."""
    import diffrl

    config, trainer, issue = NAMES[workload]
    missing = [name for name in (config, trainer) if not _exported(diffrl, name)]
    if missing:
        return False, f"not available: diffrl {diffrl.__version__} has no {' or '.join(missing)} yet ({issue})"
    return True, ""


def _exported(module, name: str) -> bool:
    try:
        getattr(module, name)
    except (AttributeError, ImportError):
        return False
    return True


def _fields(args) -> dict:
    common = dict(group_size=args.group_size, train_batch_size=args.train_batch,
                  train_gradient_accumulation_steps=args.accumulation, train_learning_rate=3e-4)
    if args.workload == "grpo":
        return dict(common, prompts_per_epoch=args.prompts, sde_window_size=args.window, kl_coef=0.04)
    # NFT: prompts_per_epoch groups of group_size in one epoch, as sample_batch_size x batches per process.
    return dict(common, sample_batch_size=args.group_size, sample_num_batches_per_epoch=args.prompts,
                nft_beta=1.0, nft_kl_coef=0.0)


class RowCounter:
    """Forward hook: latent rows of the UNet calls with and without an autograd graph."""

    def __init__(self) -> None:
        self.graph_rows, self.plain_rows = 0, 0

    def __call__(self, module, inputs, output) -> None:
        sample = inputs[0] if inputs else None
        rows = int(sample.shape[0]) if hasattr(sample, "shape") else 0
        out = getattr(output, "sample", output[0] if isinstance(output, tuple) else output)
        if getattr(out, "requires_grad", False):
            self.graph_rows += rows
        else:
            self.plain_rows += rows


def child(args) -> dict:
    import torch

    import diffrl

    available, note = availability(args.workload)
    if not available:
        return {"impl": "diffrl", "workload": args.workload, "available": False, "note": note}
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    config_name, trainer_name, _ = NAMES[args.workload]
    sampling_eta, guidance = (1.0, 5.0) if args.workload == "grpo" else (0.0, 1.0)
    reward = TimedReward(jpeg_compressibility, sync)
    with tempfile.TemporaryDirectory() as logdir:
        fields = dict(_common(args, logdir), sample_eta=sampling_eta, sample_guidance_scale=guidance)
        config = getattr(diffrl, config_name)(run_name="bench", **fields, **_fields(args))
        pipeline = diffrl.DefaultDDPOStableDiffusionPipeline(args.model, use_lora=True)
        trainer = getattr(diffrl, trainer_name)(config, reward, prompt, pipeline)
        counter = RowCounter()
        policy = getattr(pipeline, "policy", pipeline)
        unet = getattr(policy, "trainable_module", None) or policy._unet
        unet.register_forward_hook(counter)
        _page_in(trainer.sd_pipeline)
        samples = args.group_size * args.prompts
        alloc_before = torch.cuda.memory_allocated() / 2**20 if cuda else None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step = trainer.step(0, 0)  # warm-up
        counter.graph_rows, counter.plain_rows = 0, 0
        epochs = []
        for epoch in range(1, args.epochs + 1):
            reward.seconds = 0.0
            sync()
            start = time.perf_counter()
            step = trainer.step(epoch, step)
            sync()
            total = time.perf_counter() - start
            epochs.append({"epoch_s": total, "reward_s": reward.seconds, "samples_per_s": samples / total})
    result = {"impl": "diffrl", "workload": args.workload, "available": True, "samples_per_epoch": samples,
              "epochs": epochs, "unet_rows_with_graph_per_epoch": counter.graph_rows / args.epochs,
              "unet_rows_forward_only_per_epoch": counter.plain_rows / args.epochs,
              "settings": {**_fields(args), "sample_eta": sampling_eta, "sample_guidance_scale": guidance}}
    for key in ("epoch_s", "reward_s", "samples_per_s"):
        result[key] = statistics.median(e[key] for e in epochs)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        result.update(peak_memory_mb=peak, training_peak_mb=peak - alloc_before, memory="cuda max_memory_allocated")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=WORKLOADS, required=True)
    parser.add_argument("--check", action="store_true", help="only say whether the trainer exists")
    parser.add_argument("--model")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--window", type=int, default=2)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.check:
        available, note = availability(args.workload)
        print(json.dumps({"workload": args.workload, "available": available, "note": note}))
        return 0
    if not args.model:
        parser.error("--model is required unless --check is given")
    os.environ.setdefault("TQDM_DISABLE", "1")
    print(json.dumps(child(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
