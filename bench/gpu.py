"""GPU benchmark: DDPO, AlignProp, GRPO-window and NFT epochs on SD 1.5's architecture at 512x512, LoRA, bf16,
diffrl beside TRL 0.23.1, with model FLOP utilisation; then one-GPU FSDP2 and ZeRO-2 smoke runs.

    bash bench/gpu.sh                      # on one H100/H200: builds the environments, then runs this file
    python bench/gpu.py --device cuda --trl-python /tmp/diffrl-gpu-envs/trl/bin/python
    python bench/gpu.py --device cpu --tiny --epochs 1 --skip-trl      # the CPU check that keeps it running

Rows (each in a fresh process, with a wall-clock limit; see docs/benchmarks.md, "GPU (H100/H200)"):

* ``ddpo`` and ``alignprop``, diffrl and TRL 0.23.1: ``bench/throughput.py``'s child, unchanged (the same config
  fields for both libraries, one warm-up epoch, then ``--epochs`` timed epochs; medians).
* ``grpo`` (a window of ``sde_window_size`` stochastic, trained steps) and ``nft``, diffrl only (TRL has neither for
  diffusion models): ``bench/gpu_rows.py``; "not available" until diffrl has the trainers (issues 13, 14).

Figures per row: seconds per epoch, samples per second, peak GPU memory (``torch.cuda.max_memory_allocated`` from
the warm-up epoch on), and model FLOP utilisation: the UNet FLOPs of one epoch over its seconds, over the GPU's dense
bf16 peak (``bench/gpu_flops.py``: 989.4 TFLOP/s for H100 SXM and H200, by NVIDIA's datasheets) and over the rate of
a measured 8192^3 bf16 matrix product. UNet FLOPs per latent row of a forward and a forward + backward pass are
counted once by ``torch.utils.flop_counter.FlopCounterMode`` at the benchmark's shapes; per epoch, DDPO runs
``samples x steps x 2`` (CFG) forward rows while sampling and as many forward + backward rows while training;
AlignProp (K=1) the same forward rows and ``samples x 2`` backward passes; GRPO/NFT count their rows with a hook.
The VAE, the text encoder and recomputation under gradient checkpointing are not counted (model FLOPs, UNet only).

Sharded smoke runs: ``accelerate launch --config_file configs/accelerate/{fsdp,zero2}.yaml --num_processes 1
bench/gpu_sharded.py --case ...`` (full fine-tuning of the tiny SD for 2 epochs, and LoRA), pass/fail and the error.
On ``--device cpu`` the same script runs without accelerate launch (``plain``), since accelerate turns FSDP off
without a GPU. The record is printed as a markdown table and saved as JSON (``--out``, default ``$OUT/gpu.json``
when ``OUT`` is set, else ``bench/results/gpu/<date>-<commit>.json``) with the markdown beside it (``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import build_tiny_sd, machine, result_path, save_record
from gpu_flops import bf16_peak_tflops, count_unet_flops, measured_matmul_tflops
from gpu_rows import availability
from gpu_sharded import run_case
from throughput import build_sd15_random

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKLOADS = ("ddpo", "alignprop", "grpo", "nft")
SHARDED_CONFIGS = ("fsdp", "zero2")
EXPECTED_TYPE = {"fsdp": "FSDP", "zero2": "DEEPSPEED"}  # what the trainer's accelerator must report on a GPU
NAMES = {"diffrl": "diffrl", "trl": "TRL 0.23.1"}
# Sizes: (tiny model on a CPU, SD 1.5 architecture at 512x512 on a GPU).
SIZES = {"latent": (8, 64), "steps": (2, 20), "sample_batch": (2, 8), "sample_batches": (1, 2), "train_batch": (2, 4),
         "accumulation": (1, 2), "ap_batch": (1, 2), "ap_accumulation": (1, 2), "group_size": (2, 4),
         "prompts": (1, 4), "window": (1, 2)}


def _default_out() -> Path:
    return Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else result_path("gpu")


def _env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
                TQDM_DISABLE="1", PYTHONUNBUFFERED="1")


def run_json(cmd: list[str], timeout: float, threads: int) -> dict:
    """Run a child that prints one JSON line last; ``{"error": ...}`` when it fails or runs past ``timeout``."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads), timeout=max(1.0, timeout),
                             cwd=ROOT)
    except subprocess.TimeoutExpired as expired:
        tail = (expired.stderr or b"")[-2000:]
        return {"error": f"timed out after {timeout:.0f} s", "stderr_tail": tail.decode(errors="replace")
                if isinstance(tail, bytes) else tail}
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return {"error": f"exit code {out.returncode}", "stderr_tail": out.stderr[-3000:]}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": "no JSON on the last line of stdout", "stdout_tail": out.stdout[-2000:]}


# ---------------------------------------------------------------------------------------------- rows


def _throughput_cmd(args, python: str, impl: str, workload: str, model: Path) -> list[str]:
    cmd = [python, str(HERE / "throughput.py"), "--child", impl, "--workload", workload, "--model", str(model),
           "--device", args.device, "--mixed-precision", args.mixed_precision, "--epochs", str(args.epochs),
           "--threads", str(args.threads)] + ([] if args.tiny else ["--sd15-random"])
    for name in ("latent", "steps", "sample_batch", "sample_batches", "train_batch", "accumulation", "ap_batch",
                 "ap_accumulation"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return cmd


def _rows_cmd(args, workload: str, model: Path) -> list[str]:
    cmd = [sys.executable, str(HERE / "gpu_rows.py"), "--workload", workload, "--model", str(model), "--device",
           args.device, "--mixed-precision", args.mixed_precision, "--epochs", str(args.epochs), "--threads",
           str(args.threads), "--steps", str(args.steps)]
    return cmd + ["--group-size", str(args.group_size), "--prompts", str(args.prompts), "--window",
                  str(args.window), "--train-batch", str(args.train_batch)]


def unet_rows(args, workload: str, result: dict) -> tuple[float, float]:
    """(forward-only rows, forward + backward rows) of UNet calls per epoch; each sample is a CFG pair (guidance 5)."""
    if "unet_rows_with_graph_per_epoch" in result:  # counted by gpu_rows.py's hook
        return result["unet_rows_forward_only_per_epoch"], result["unet_rows_with_graph_per_epoch"]
    samples = result["samples_per_epoch"]
    if workload == "ddpo":  # sampling: every step; training: every timestep (fraction 1), train_cfg, one inner epoch
        return samples * args.steps * 2, samples * args.steps * 2
    return samples * (args.steps - 1) * 2, samples * 1 * 2  # alignprop, K=1: one step of each sample has a graph


def add_utilisation(args, workload: str, result: dict, flops: dict, peak: float | None,
                    matmul: float | None) -> None:
    """UNet TFLOPs per epoch, achieved TFLOP/s and MFU against the datasheet peak and the measured matmul rate."""
    if "error" in result or not result.get("available", True) or "unet_forward_flops_per_row" not in flops:
        return
    plain, graph = unet_rows(args, workload, result)
    total = plain * flops["unet_forward_flops_per_row"] + graph * flops["unet_forward_backward_flops_per_row"]
    achieved = total / result["epoch_s"] / 1e12
    result.update(unet_rows_forward_only=plain, unet_rows_forward_backward=graph, unet_tflop_per_epoch=total / 1e12,
                  achieved_tflops=achieved, mfu=achieved / peak if peak else None,
                  mfu_vs_measured_matmul=achieved / matmul if matmul else None)


def unet_flops(args, model: Path) -> dict:
    """Per-row UNet FLOPs (and on CUDA the measured matmul rate), counted in this process, memory freed after."""
    import gc

    import torch

    try:
        flops = count_unet_flops(str(model), args.device, args.latent, args.mixed_precision)
        if args.device == "cuda":
            flops["measured_bf16_matmul_tflops"] = measured_matmul_tflops()
    except Exception as error:  # noqa: BLE001 - the timed rows still run; MFU is left out
        flops = {"error": f"{type(error).__name__}: {error}"}
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return flops


# ---------------------------------------------------------------------------------------------- sharded smoke runs


def sharded_runs(args, deadline: float, tmp: Path) -> list[dict]:
    """Each (config, case) in its own ``accelerate launch``; ``plain`` runs the same code in this process."""
    records = []
    latent, steps = (args.latent, args.steps) if args.tiny else (16, 4)
    for config in args.sharded_configs:
        for case in args.sharded_cases:
            row = {"config": config, "case": case}
            left = deadline - time.time()
            if left < 20:
                records.append(dict(row, passed=False, note="skipped: past the time budget"))
                continue
            out = tmp / f"sharded_{config}_{case}.json"
            script = [str(HERE / "gpu_sharded.py"), "--case", case, "--device", args.device, "--out", str(out),
                      "--mixed-precision", args.mixed_precision, "--epochs", str(args.sharded_epochs),
                      "--latent", str(latent), "--steps", str(steps)]
            if config == "plain":  # the CPU check: the same script's code, in this process (one start less)
                sub = argparse.Namespace(epochs=args.sharded_epochs, mixed_precision=args.mixed_precision,
                                         device=args.device, latent=latent, steps=steps)
                records.append(dict(row, **run_case(case, sub)))
            else:
                python = args.deepspeed_python if config == "zero2" else sys.executable
                cmd = [python, "-m", "accelerate.commands.launch", "--config_file",
                       str(ROOT / "configs" / "accelerate" / f"{config}.yaml"), "--num_processes", "1", *script]
                printed = run_json(cmd, min(args.sharded_timeout, left), args.threads)
                if out.is_file():
                    records.append(dict(row, **json.loads(out.read_text())))
                else:  # the launch itself failed (e.g. DeepSpeed not installed) or timed out
                    records.append(dict(row, passed=False, error=printed.get("error", "no record written"),
                                        traceback_tail=printed.get("stderr_tail", "")[-2000:]))
            r = records[-1]
            expected = EXPECTED_TYPE.get(config)
            if expected and r.get("passed") and expected not in str(r.get("distributed_type")):
                r.update(passed=False, error=f"accelerate ran it as {r.get('distributed_type')}, not {expected}")
            print(f"sharded {config:5s} {case:15s} {'passed' if r.get('passed') else 'FAILED'} "
                  f"{r.get('distributed_type', '')} {r.get('error', '')}", flush=True)
    return records


# ---------------------------------------------------------------------------------------------- output


def _cell(value, fmt: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{fmt}}{suffix}"


def markdown(record: dict) -> str:
    gpu = record["gpu"]
    lines = [f"GPU: {gpu['name']}; bf16 dense peak {_cell(gpu['bf16_peak_tflops'], '.1f', ' TFLOP/s') or 'unknown'};"
             f" measured 8192^3 bf16 matmul {_cell(gpu['measured_bf16_matmul_tflops'], '.0f', ' TFLOP/s') or '-'}",
             "",
             "| workload | implementation | s/epoch | samples/s | peak GPU memory | UNet TFLOP/epoch | TFLOP/s | "
             "MFU (peak) | MFU (matmul) | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["results"]:
        name = NAMES.get(r["impl"], r["impl"])
        if "error" in r or not r.get("available", True) or "epoch_s" not in r:
            note = r.get("note") or f"failed: {r.get('error', '?')} (see JSON)"
            lines.append(f"| {r['workload']} | {name} | | | | | | | | {note} |")
            continue
        memory = r.get("peak_memory_mb") if r.get("memory", "").startswith("cuda") else None
        lines.append(f"| {r['workload']} | {name} | {r['epoch_s']:.2f} | {r['samples_per_s']:.2f} | "
                     f"{_cell(memory and memory / 1024, '.1f', ' GiB')} | "
                     f"{_cell(r.get('unet_tflop_per_epoch'), '.4g')} | "
                     f"{_cell(r.get('achieved_tflops'), '.4g')} | {_cell(r.get('mfu'), '.1%')} | "
                     f"{_cell(r.get('mfu_vs_measured_matmul'), '.1%')} | {r.get('note', '')} |")
    if record["sharded"]:
        lines += ["", "| sharded config | case | distributed type | result | error | s |", "|---|---|---|---|---|---|"]
        for s in record["sharded"]:
            result = "passed" if s.get("passed") else ("skipped" if "note" in s else "FAILED")
            error = (s.get("error") or s.get("note") or "").replace("|", "/").replace("\n", " ")[:160]
            lines.append(f"| {s['config']} | {s['case']} | {s.get('distributed_type', '')} | {result} | {error} | "
                         f"{_cell(s.get('seconds'), '.1f')} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- driver


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="diffrl's tiny random SD at small sizes instead of SD 1.5's architecture at 512x512")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch (default 2)")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"],
                        help="default bf16 on CUDA, no (fp32) on the CPU")
    for name, (tiny, big) in SIZES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"default {big} ({tiny} with --tiny)")
    parser.add_argument("--threads", type=int, help="torch/OpenMP threads per child (default 4 on CUDA, 1 on CPU)")
    parser.add_argument("--trl-python", help="a Python with trl==0.23.1 (bench/gpu.sh builds one)")
    parser.add_argument("--skip-trl", action="store_true", help="diffrl rows only")
    parser.add_argument("--trl-note", default="", help="why TRL is not run (recorded in the rows)")
    parser.add_argument("--sharded-configs", nargs="*", choices=(*SHARDED_CONFIGS, "plain"),
                        help="default fsdp zero2 on CUDA, plain on the CPU; none to skip")
    parser.add_argument("--deepspeed-python", default=sys.executable,
                        help="the Python (with DeepSpeed) that launches the zero2 runs (default: this one)")
    parser.add_argument("--sharded-cases", nargs="+", default=["ddpo-full", "alignprop-full", "ddpo-lora"])
    parser.add_argument("--sharded-epochs", type=int, default=2)
    parser.add_argument("--sharded-timeout", type=float, default=150.0, help="seconds per sharded launch")
    parser.add_argument("--row-timeout", type=float, default=180.0, help="seconds per benchmark row")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds for the whole run: nothing starts later, each child is cut at it (default 420)")
    parser.add_argument("--sharded-reserve-s", type=float, default=140.0,
                        help="seconds of the budget kept for the sharded smoke runs (default 140)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for a GPU not in the table")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default $OUT/gpu.json or bench/results)")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible; run with --device cpu --tiny on a CPU")
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if args.device == "cuda" else "no"
    for name, (tiny, big) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else big)
    if args.threads is None:
        args.threads = 4 if args.device == "cuda" else 1
    if args.sharded_configs is None:
        args.sharded_configs = list(SHARDED_CONFIGS) if args.device == "cuda" else ["plain"]
    if args.skip_trl:
        args.trl_python, args.trl_note = None, args.trl_note or "not run: --skip-trl"
    elif not args.trl_python:
        args.trl_note = args.trl_note or "not run: no --trl-python given"
    args.out = args.out or _default_out()
    return args


def main(argv=None) -> int:
    args = parse(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    started = time.time()
    end = started + args.budget_s
    deadline = end - (args.sharded_reserve_s if args.sharded_configs else 0.0)  # for the benchmark rows
    info = machine()
    name = info["gpu"] or info["cpu"]
    peak = args.peak_tflops or (bf16_peak_tflops(info["gpu"]) if args.device == "cuda" else None)
    print(f"machine: {name}, {info['cores']} cores; bf16 peak {peak} TFLOP/s", flush=True)
    results, sharded, flops = [], [], {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        build_start = time.time()
        model = (build_tiny_sd if args.tiny else build_sd15_random)(tmp / "model", args.latent)
        build_s = time.time() - build_start
        print(f"model built in {build_s:.1f} s", flush=True)
        flops = unet_flops(args, model)
        print(f"UNet FLOPs per row: {flops}", flush=True)
        matmul = flops.get("measured_bf16_matmul_tflops")
        for workload in args.workloads:
            impls = ["diffrl", "trl"]
            for impl in impls:
                row = {"impl": impl, "workload": workload}
                if impl == "trl" and workload in ("grpo", "nft"):
                    results.append(dict(row, available=False,
                                        note="not available: TRL 0.23.1 has no diffusion GRPO/NFT trainer"))
                    continue
                if impl == "trl" and not args.trl_python:
                    results.append(dict(row, available=False, note=args.trl_note))
                    continue
                left = deadline - time.time()
                if left < 10:
                    results.append(dict(row, available=False, note="skipped: past the time budget"))
                    continue
                if workload in ("grpo", "nft"):
                    available, note = availability(workload)
                    if not available:
                        results.append(dict(row, available=False, note=note))
                        print(f"{impl:6s} {workload:9s} {note}", flush=True)
                        continue
                    cmd = _rows_cmd(args, workload, model)
                else:
                    cmd = _throughput_cmd(args, sys.executable if impl == "diffrl" else args.trl_python, impl,
                                          workload, model)
                result = dict(row, **run_json(cmd, min(args.row_timeout, left), args.threads))
                add_utilisation(args, workload, result, flops, peak, matmul)
                results.append(result)
                state = result.get("note") or result.get("error") or (
                    f"{result['epoch_s']:.2f} s/epoch, {result['samples_per_s']:.2f} samples/s, "
                    f"MFU {_cell(result.get('mfu'), '.1%') or '-'}")
                print(f"{impl:6s} {workload:9s} {state}", flush=True)
        if args.sharded_configs:
            sharded = sharded_runs(args, end, tmp)
    record = {"command": " ".join(["python", "bench/gpu.py"] + (sys.argv[1:] if argv is None else list(argv))),
              "settings": {"model": "diffrl tiny Stable Diffusion" if args.tiny else
                           "SD 1.5 architecture, random weights", "device": args.device, "latent": args.latent,
                           "image": args.latent * (2 if args.tiny else 8), "precision": args.mixed_precision,
                           "lora_rank": 4, "timed_epochs": args.epochs, "warmup_epochs": 1,
                           "threads": args.threads, "model_build_s": round(build_s, 1),
                           **{k: getattr(args, k) for k in SIZES if k != "latent"}},
              "gpu": {"name": info["gpu"], "bf16_peak_tflops": peak, "measured_bf16_matmul_tflops": matmul},
              "flops": flops, "machine": dict(info, load_average_at_end=os.getloadavg()),
              "wall_s": round(time.time() - started, 1), "results": results, "sharded": sharded}
    text = markdown(record)
    record["markdown"] = text
    print("\n" + text)
    path = save_record(record, args.out)
    path.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
    print(f"saved {path} and {path.with_suffix('.md')} ({record['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
