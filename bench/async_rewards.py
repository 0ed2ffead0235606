"""Does ``async_reward_computation`` overlap reward scoring with sampling? Epoch time, sync vs async.

A reward that waits ``--reward-seconds`` per batch (standing in for a remote or GPU-bound reward model that
releases the GIL) scores the tiny DDPM's samples; with async rewards each batch is scored while the next
one samples, so the epoch should take about max(sampling, scoring) instead of their sum.

    python bench/async_rewards.py [--reward-seconds 0.5] [--batches 6]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from common import machine, result_path, save_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward-seconds", type=float, default=0.5)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--out", default=str(result_path("async_rewards")))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from diffrl import DDPOConfig, DDPOTrainer, DefaultDDPODDPMPipeline
    from diffrl.testing.models import save_tiny_ddpm

    def slow_reward(images, prompts, metadata):
        time.sleep(args.reward_seconds)
        return images.mean(dim=(1, 2, 3)), {}

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = str(save_tiny_ddpm(Path(tmp) / "ddpm"))
        for mode in (False, True):
            config = DDPOConfig(num_epochs=2, sample_num_steps=20, sample_batch_size=8,
                                sample_num_batches_per_epoch=args.batches, train_batch_size=8, mixed_precision="no",
                                logdir=str(Path(tmp) / "logs"), run_name=f"async_{mode}",
                                async_reward_computation=mode, max_workers=2)
            trainer = DDPOTrainer(config, slow_reward, lambda: ("", {}), DefaultDDPODDPMPipeline(model))
            trainer.step(0, 0)  # warm-up
            start = time.perf_counter()
            trainer.step(1, 0)
            m = trainer.last_metrics
            results["async" if mode else "sync"] = {
                "sampling_and_reward_s": round(m["perf/sampling_s"] + m["perf/reward_s"], 3),
                "sampling_s": round(m["perf/sampling_s"], 3), "reward_wait_s": round(m["perf/reward_s"], 3),
                "epoch_s": round(time.perf_counter() - start, 3)}
    report = {"command": f"python bench/async_rewards.py --reward-seconds {args.reward_seconds} --batches {args.batches}",
              "machine": machine(), "reward_seconds_per_batch": args.reward_seconds, "batches": args.batches,
              "results": results}
    save_record(report, args.out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
