"""Per-process memory of the trained weights, their gradients and the optimizer state: FSDP2 vs data parallel.

    python bench/sharded_memory.py                 # 2 and 4 CPU processes, both launchers (a few minutes)
    python bench/sharded_memory.py --processes 2   # one process count

The question: does ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` (diffrl's own FSDP2, the same
path on CPU processes as on GPUs) divide the memory of full fine-tuning by the number of processes, as sharding
should? Each configuration runs one DDPO epoch of full fine-tuning of a random UNet2DModel (17.4M weights)
through ``DDPOTrainer``; every process records the bytes *it* holds of the trainable parameters, of their
gradients (read just before the optimizer step) and of AdamW's state (after the step), counting only local shards
under FSDP2. Data parallel holds all of them on every process. Activation memory (what sampling and the
forward pass allocate) is not counted: it depends on the batch, not on sharding. Byte counts, not timings, so the
machine's load does not change them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = {"data_parallel": ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no",
                               "--dynamo_backend", "no"],
             "fsdp2": ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml")]}


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def worker(model: str, out: Path) -> None:
    """One process of a run: train one epoch, write this process's byte counts to ``out/rank_<r>.json``."""
    import torch

    from diffrl import DDPOConfig, DDPOTrainer, DefaultDDPODDPMPipeline

    config = DDPOConfig(num_epochs=1, sample_num_steps=2, sample_batch_size=2, sample_num_batches_per_epoch=1,
                        train_batch_size=2, train_lora=False, mixed_precision="no", logdir=str(out / "logs"),
                        run_name="memory", save_freq=100, seed=0)

    def reward(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3)), {}

    trainer = DDPOTrainer(config, reward, lambda: ("", {}), DefaultDDPODDPMPipeline(model, use_lora=False))
    params = list(trainer.policy.trainable_parameters())
    optimizer = trainer.recipe.update.optimizer
    seen: dict[str, int] = {}
    step = optimizer.step

    def measured_step(*args, **kwargs):
        seen.setdefault("gradients", _local_bytes(p.grad for p in params))
        result = step(*args, **kwargs)
        seen.setdefault("optimizer_state", _local_bytes(v for s in optimizer.state.values() for v in s.values()
                                                        if torch.is_tensor(v) and v.dim() > 0))
        return result

    optimizer.step = measured_step
    trainer.train()
    rank = trainer.accelerator.process_index
    record = {"rank": rank, "processes": trainer.accelerator.num_processes,
              "sharded": type(trainer.policy.trainable_module).__name__.startswith("FSDP"),
              "parameters": _local_bytes(params), "whole_parameters": sum(p.numel() * 4 for p in params), **seen}
    (out / f"rank_{rank}.json").write_text(json.dumps(record))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_unet(directory: Path) -> Path:
    """A random UNet2DModel (DDPM, 32x32 RGB, 4 levels): big enough that weights dominate small buffers."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128, 256, 256),
                       layers_per_block=1, norm_num_groups=32)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(directory)
    return directory


def run(launcher: str, processes: int, model: Path, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *LAUNCHERS[launcher], "--num_processes",
           str(processes), "--main_process_port", str(_free_port()), __file__, "--worker", str(model), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{launcher} on {processes} processes failed:\n{done.stderr[-3000:]}")
    return [json.loads((out / f"rank_{r}.json").read_text()) for r in range(processes)]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2], Path(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", default=None, help="record path (default bench/results/sharded_memory/...)")
    args = parser.parse_args()
    start_machine = common.machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_unet(Path(tmp) / "unet")
        for processes in args.processes:
            for launcher in LAUNCHERS:
                ranks = run(launcher, processes, model, Path(tmp) / f"{launcher}-{processes}")
                worst = {k: max(r[k] for r in ranks) for k in ("parameters", "gradients", "optimizer_state")}
                rows.append({"launcher": launcher, "processes": processes, "sharded": all(r["sharded"] for r in ranks),
                             "whole_parameters": ranks[0]["whole_parameters"], "per_process_max": worst,
                             "per_rank": ranks})
    print(f"{'launcher':<14} {'procs':>5} {'sharded':>7} {'params MB':>10} {'grads MB':>9} {'adam MB':>8} "
          f"{'total MB':>9}")
    for row in rows:
        m = row["per_process_max"]
        total = sum(m.values())
        print(f"{row['launcher']:<14} {row['processes']:>5} {str(row['sharded']):>7} {m['parameters'] / 2**20:>10.2f} "
              f"{m['gradients'] / 2**20:>9.2f} {m['optimizer_state'] / 2**20:>8.2f} {total / 2**20:>9.2f}")
    record = {"benchmark": "sharded_memory", "command": common.command_line(), "machine": start_machine,
              "question": "per-process bytes of trainable parameters, gradients and AdamW state, FSDP2 vs DP",
              "rows": rows}
    path = common.save_record(record, args.out or common.result_path("sharded_memory"))
    print(f"record: {path}")


if __name__ == "__main__":
    main()
