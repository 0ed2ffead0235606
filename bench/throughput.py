"""Seconds per epoch (sampling, reward, training), samples per second and peak memory: diffrl vs TRL 0.23.1.

    python bench/throughput.py                                              # diffrl, tiny SD on the CPU
    python bench/throughput.py --trl-python /tmp/trlvenv/bin/python         # ... and TRL 0.23.1 beside it
    python bench/throughput.py --device cuda --sd15-random --mixed-precision fp16 \\
        --trl-python /path/to/trl-venv/bin/python --out bench/results/throughput/<date>-<commit>-sd15-cuda.json   # on a GPU

Two workloads, the same ``DDPOConfig``/``AlignPropConfig`` fields for both libraries:

* ``ddpo``: DDPO-IS. ``--sample-batch`` x ``--sample-batches`` samples per epoch, ``--steps`` DDIM steps
  (eta 1, guidance 5: each UNet call runs on 2 x batch, in sampling and, with ``train_cfg``, in training),
  then one inner epoch over every timestep in micro-batches of ``--train-batch`` with
  ``--accumulation`` micro-batches per optimizer step. Reward: JPEG compressibility (minus the kB of the
  image saved at quality 95, the DDPO paper's), defined here so both libraries call the very same function.
* ``alignprop``: reward backpropagation with K=1 (only the last step carries gradients; TRL's fields
  ``truncated_backprop_rand=False, truncated_backprop_timestep=steps-1``), gradient checkpointing on (both
  libraries' default), ``--ap-batch`` x ``--ap-accumulation`` samples per epoch. Reward: mean brightness.

Both use LoRA rank 4 on ``to_q, to_k, to_v, to_out.0`` and the precision of ``--mixed-precision``. The model
is diffrl's tiny random Stable Diffusion (``diffrl.testing.models``) saved to disk, sampled at ``--latent``
latents, or with ``--sd15-random`` one with Stable Diffusion 1.5's architecture and random weights (UNet
``block_out_channels=(320, 640, 1280, 1280)``, ``cross_attention_dim=768``; SD 1.5's VAE; a 12-layer
768-wide CLIP text encoder over a small generated vocabulary), built here, no download.

Each (library, workload) runs in a fresh process with ``--threads`` torch/OpenMP threads: load, build the
trainer, one warm-up epoch, then ``--epochs`` timed epochs (``trainer.step``). The split: *reward* is the time
inside the reward function (a wrapper, both libraries); *sampling* is, for diffrl, the run's own ``perf/sampling_s`` (AlignProp: less the reward's time), and for
TRL the time in its sampling method (``_generate_samples``; for AlignProp the forward
pass through the sampler with gradients) less the reward time inside it; *training* is the rest of the epoch (DDPO: the policy-gradient
updates; AlignProp: the backward pass and the optimizer step). Samples per second = samples per epoch / epoch
seconds. Memory on the CPU is the resident set size (see ``bench/README.md``): ``peak_memory_mb`` is
``ru_maxrss``, the process's high-water mark, and ``training_peak_mb`` that peak minus the RSS once the trainer
is built and its weights paged in, before the warm-up epoch. On CUDA ``peak_memory_mb`` is
``torch.cuda.max_memory_allocated`` from the warm-up epoch on, and ``training_peak_mb`` that peak minus the
memory allocated once the trainer is built.

TRL 0.23.1 workarounds, all in its child process: a ``PartialState()`` before its pipeline is built (it logs
through accelerate's logger when the model has no LoRA file); ``project_kwargs`` with a ``project_dir`` and
``automatic_checkpoint_naming`` (its ``accelerator.save_state()`` raises with TRL's default empty project
config, REFERENCE.md defect 1); ``save_freq`` beyond the run, so neither library saves a checkpoint inside the
timed epochs; no image hook (TRL indexes ``accelerator.trackers[0]``, which is empty without a tracker).
Results print as a table and are saved as JSON to ``--out`` (default ``bench/results/throughput/<date>-<commit>.json``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import build_tiny_sd, machine, peak_rss_mb, result_path, rss_mb, save_record, versions

HERE = Path(__file__).resolve().parent
WORKLOADS = ("ddpo", "alignprop")


# ---------------------------------------------------------------------------------------------- rewards and prompts


class TimedReward:
    """Wraps a TRL-signature reward and adds up the seconds spent in it."""

    def __init__(self, fn, sync) -> None:
        self.fn, self.sync, self.seconds = fn, sync, 0.0
        self.__name__ = getattr(fn, "__name__", "reward")

    def __call__(self, images, prompts, metadata):
        self.sync()
        start = time.perf_counter()
        out = self.fn(images, prompts, metadata)
        self.sync()
        self.seconds += time.perf_counter() - start
        return out


def jpeg_compressibility(images, prompts, metadata):
    """Minus the size in kB of each image saved as JPEG at quality 95 (the DDPO paper's reward)."""
    import torch
    from PIL import Image

    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000.0)
    return -torch.tensor(sizes, dtype=torch.float32, device=images.device), {}


def brightness(images, prompts, metadata):
    """Mean pixel value (differentiable)."""
    return images.mean(dim=(1, 2, 3)), {}


def prompt():
    return "a photo of a cat", {}


# ---------------------------------------------------------------------------------------------- one setting (child)


def _common(args, logdir: str) -> dict:
    """Fields both libraries' configs read the same way."""
    return dict(num_epochs=100000, save_freq=100000, sample_num_steps=args.steps, sample_eta=1.0,
                sample_guidance_scale=5.0, mixed_precision=args.mixed_precision, seed=0, logdir=logdir,
                accelerator_kwargs={"cpu": True} if args.device == "cpu" else {})


def _ddpo_fields(args) -> dict:
    return dict(sample_batch_size=args.sample_batch, sample_num_batches_per_epoch=args.sample_batches,
                train_batch_size=args.train_batch, train_gradient_accumulation_steps=args.accumulation,
                train_learning_rate=3e-4, train_timestep_fraction=1.0, train_num_inner_epochs=1, train_cfg=True)


def _alignprop_fields(args) -> dict:
    return dict(train_batch_size=args.ap_batch, train_gradient_accumulation_steps=args.ap_accumulation,
                truncated_backprop_rand=False, truncated_backprop_timestep=args.steps - 1, train_learning_rate=1e-3)


def _diffrl_trainer(args, logdir: str, reward):
    from diffrl import (
        AlignPropConfig,
        AlignPropTrainer,
        DDPOConfig,
        DDPOTrainer,
        DefaultDDPOStableDiffusionPipeline,
    )

    pipeline = DefaultDDPOStableDiffusionPipeline(args.model, use_lora=True)
    if args.workload == "ddpo":
        config = DDPOConfig(run_name="bench", train_timestep_chunk=args.timestep_chunk, **_common(args, logdir),
                            **_ddpo_fields(args))
        return DDPOTrainer(config, reward, prompt, pipeline), None
    config = AlignPropConfig(run_name="bench", gradient_checkpointing=True, **_common(args, logdir),
                             **_alignprop_fields(args))
    return AlignPropTrainer(config, reward, prompt, pipeline), None


def _trl_trainer(args, logdir: str, reward):
    import warnings

    warnings.filterwarnings("ignore")
    from accelerate import PartialState

    PartialState(cpu=args.device == "cpu")  # TRL's pipeline logs through accelerate before any Accelerator exists
    from trl import (
        AlignPropConfig,
        AlignPropTrainer,
        DDPOConfig,
        DDPOTrainer,
        DefaultDDPOStableDiffusionPipeline,
    )

    # TRL wires no output folder into accelerate, so its save_state() raises (REFERENCE.md defect 1).
    project = {"project_dir": logdir, "automatic_checkpoint_naming": True}
    pipeline = DefaultDDPOStableDiffusionPipeline(args.model, use_lora=True)
    if args.workload == "ddpo":
        config = DDPOConfig(project_kwargs=project, **_common(args, logdir), **_ddpo_fields(args))
        return DDPOTrainer(config, reward, prompt, pipeline), "_generate_samples"
    config = AlignPropConfig(project_kwargs=project, **_common(args, logdir), **_alignprop_fields(args))
    return AlignPropTrainer(config, reward, prompt, pipeline), "_generate_samples"


def _page_in(pipeline) -> None:
    """Read every weight once. Loaded safetensors stay memory-mapped until first touched, so without this the
    weights of a large model would enter the RSS during the first epoch and count as "training" memory."""
    import torch

    with torch.no_grad():
        for name in ("unet", "vae", "text_encoder"):
            module = getattr(pipeline, name, None)
            for tensor in (module.state_dict().values() if module is not None else ()):
                if tensor.device.type == "cpu":
                    tensor.sum()


def child(args) -> None:
    """One (library, workload) in this fresh process; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    load_start = os.getloadavg()
    reward = TimedReward(jpeg_compressibility if args.workload == "ddpo" else brightness, sync)
    with tempfile.TemporaryDirectory() as logdir:
        build = _diffrl_trainer if args.impl == "diffrl" else _trl_trainer
        trainer, sampling_method = build(args, logdir, reward)
        sampling = {"s": 0.0}
        if sampling_method is not None:  # TRL: time its sampling method; diffrl reports perf/sampling_s itself
            inner = getattr(trainer, sampling_method)

            def timed_sampling(*a, **kw):
                sync()
                start = time.perf_counter()
                out = inner(*a, **kw)
                sync()
                sampling["s"] += time.perf_counter() - start
                return out

            setattr(trainer, sampling_method, timed_sampling)
        samples = (args.sample_batch * args.sample_batches if args.workload == "ddpo"
                   else args.ap_batch * args.ap_accumulation)
        _page_in(trainer.sd_pipeline)
        sync()
        rss_before = rss_mb()  # the model and trainer are set up, its weights resident; no epoch yet
        alloc_before = torch.cuda.memory_allocated() / 2**20 if cuda else None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step = trainer.step(0, 0)  # warm-up
        epochs = []
        for epoch in range(1, args.epochs + 1):
            sampling["s"], reward.seconds = 0.0, 0.0
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            step = trainer.step(epoch, step)
            sync()
            total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            reward_s = reward.seconds
            if args.impl == "diffrl":  # the run's own metrics; AlignProp's sampling with gradients includes scoring
                sampling_s = trainer.last_metrics["perf/sampling_s"] - (reward_s if args.workload == "alignprop" else 0.0)
            else:
                sampling_s = sampling["s"]
            epochs.append({"epoch_s": total, "epoch_cpu_s": cpu, "sampling_s": sampling_s, "reward_s": reward_s,
                           "training_s": total - sampling_s - reward_s, "samples_per_s": samples / total})
        own = {k: v for k, v in getattr(trainer, "last_metrics", {}).items() if k.startswith("perf/")}
    result = {"impl": args.impl, "workload": args.workload, "samples_per_epoch": samples, "epochs": epochs,
              "load_average_start": load_start, "load_average_end": os.getloadavg(), "versions": versions()}
    for key in ("epoch_s", "epoch_cpu_s", "sampling_s", "reward_s", "training_s", "samples_per_s"):
        result[key] = statistics.median(e[key] for e in epochs)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        result.update(peak_memory_mb=peak, training_peak_mb=peak - alloc_before, memory="cuda max_memory_allocated")
    else:
        peak = peak_rss_mb()
        result.update(peak_memory_mb=peak, training_peak_mb=peak - rss_before, memory="RSS",
                      rss_before_training_mb=rss_before)
    if own:
        result["diffrl_logged_last_epoch"] = own
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------- models


def build_sd15_random(directory: Path, latent: int) -> Path:
    """Stable Diffusion 1.5's architecture with random weights (``runwayml/stable-diffusion-v1-5``'s configs,
    written out here; no download). The text encoder is CLIP ViT-L/14's text tower (12 layers, width 768,
    77 positions) over diffrl's small generated vocabulary instead of CLIP's 49,408 tokens: only the size of
    the embedding table differs, which no step of the benchmark scales with."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffrl.testing.tokenizer import make_clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
        freq_shift=0, center_input_sample=False, downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, act_fn="silu", sample_size=latent * 8, scaling_factor=0.18215)
    tokenizer = make_clip_tokenizer(directory / "_tokenizer_tmp", model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory)
    make_clip_tokenizer(directory / "tokenizer", model_max_length=77)
    return directory


# ---------------------------------------------------------------------------------------------- driver


def _defaults(args) -> None:
    """Sizes left unset: small ones for the tiny model on a CPU, SD-scale ones for ``--sd15-random``."""
    sd15 = args.sd15_random
    for name, tiny, big in (("latent", 32, 64), ("steps", 20, 20), ("sample_batch", 8, 8), ("sample_batches", 2, 2),
                            ("train_batch", 4, 4), ("accumulation", 2, 2), ("ap_batch", 4, 2),
                            ("ap_accumulation", 2, 2)):
        if getattr(args, name) is None:
            setattr(args, name, big if sd15 else tiny)


def _print_row(r: dict) -> None:
    print(f"{r['impl']:7s} {r['workload']:9s} epoch {r['epoch_s']:7.2f} s (CPU {r['epoch_cpu_s']:7.2f} s) = sampling {r['sampling_s']:6.2f} + "
          f"reward {r['reward_s']:5.2f} + training {r['training_s']:6.2f}   {r['samples_per_s']:6.2f} samples/s   "
          f"peak {r['peak_memory_mb']:8.1f} MB   training peak {r['training_peak_mb']:7.1f} MB   "
          f"load {r['load_average_start'][0]:.2f}", flush=True)


def markdown(results: list[dict]) -> str:
    lines = ["| workload | implementation | run | epoch | epoch CPU | sampling | reward | training | samples/s | peak memory | "
             "training peak | load avg (1 min) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    names = {"diffrl": "diffrl", "trl": "TRL 0.23.1"}
    for r in results:
        run = r.get("repeat", 0)
        run = f"median of {r['runs']}" if run == "median" else str(run)
        if "error" in r:
            lines.append(f"| {r['workload']} | {names[r['impl']]} | {run} | failed: see JSON | | | | | | | | |")
            continue
        lines.append(f"| {r['workload']} | {names[r['impl']]} | {run} | {r['epoch_s']:.2f} s | "
                     f"{r['epoch_cpu_s']:.2f} s | {r['sampling_s']:.2f} s | "
                     f"{r['reward_s']:.3f} s | {r['training_s']:.2f} s | {r['samples_per_s']:.2f} | "
                     f"{r['peak_memory_mb']:.0f} MB | {r['training_peak_mb']:.0f} MB | "
                     f"{r['load_average_start'][0]:.2f} -> {r['load_average_end'][0]:.2f} |")
    for workload, (wall, cpu) in ratios(results).items():
        lines.append(f"\n{workload}: diffrl / TRL seconds per epoch = {wall:.2f} (wall), {cpu:.2f} (CPU)")
    return "\n".join(lines)


def ratios(results: list[dict]) -> dict[str, tuple[float, float]]:
    """diffrl's seconds per epoch over TRL's, per workload, in wall-clock and in CPU time (the median rows when
    there are repeats)."""
    out = {}
    for workload in dict.fromkeys(r["workload"] for r in results):
        rows = [r for r in results if r["workload"] == workload and "error" not in r]
        medians = [r for r in rows if r.get("repeat") == "median"]
        rows = medians or rows
        by_impl = {r["impl"]: r for r in rows}
        if "diffrl" in by_impl and "trl" in by_impl:
            d, t = by_impl["diffrl"], by_impl["trl"]
            out[workload] = (d["epoch_s"] / t["epoch_s"], d["epoch_cpu_s"] / t["epoch_cpu_s"])
    return out


def _run_child(args, impl: str, python: str, workload: str, model: Path) -> dict:
    """One (library, workload) in a fresh process; its JSON result, or ``{"error": ...}``."""
    cmd = [python, __file__, "--child", impl, "--workload", workload, "--model", str(model),
           "--device", args.device, "--mixed-precision", args.mixed_precision, "--epochs", str(args.epochs),
           "--threads", str(args.threads)] + (["--sd15-random"] if args.sd15_random else [])
    for name in ("latent", "steps", "sample_batch", "sample_batches", "train_batch", "accumulation",
                 "ap_batch", "ap_accumulation", "timestep_chunk"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TRANSFORMERS_VERBOSITY="error",
               HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(f"{impl} {workload} failed:\n{out.stderr[-3000:]}", file=sys.stderr, flush=True)
        return {"impl": impl, "workload": workload, "error": out.stderr[-3000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _medians(results: list[dict]) -> list[dict]:
    """One row per (library, workload): the median over the repeats of each run's median epoch."""
    rows = []
    for workload in dict.fromkeys(r["workload"] for r in results):
        for impl in dict.fromkeys(r["impl"] for r in results):
            runs = [r for r in results if r["impl"] == impl and r["workload"] == workload and "error" not in r]
            if not runs:
                continue
            row = {"impl": impl, "workload": workload, "repeat": "median", "runs": len(runs),
                   "load_average_start": [statistics.median(r["load_average_start"][0] for r in runs)],
                   "load_average_end": [statistics.median(r["load_average_end"][0] for r in runs)]}
            for key in ("epoch_s", "epoch_cpu_s", "sampling_s", "reward_s", "training_s", "samples_per_s", "peak_memory_mb",
                        "training_peak_mb"):
                row[key] = statistics.median(r[key] for r in runs)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sd15-random", action="store_true",
                        help="Stable Diffusion 1.5's architecture with random weights instead of the tiny model")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                        help="default: 'no' (fp32) on the CPU, 'fp16' on CUDA")
    parser.add_argument("--latent", type=int, help="latent size; images are 8x it for SD 1.5, 2x for the tiny model "
                                                   "(default 32 tiny, 64 SD 1.5 = 512x512)")
    parser.add_argument("--steps", type=int, help="DDIM steps (default 20)")
    parser.add_argument("--sample-batch", type=int, help="DDPO sample_batch_size (default 8)")
    parser.add_argument("--sample-batches", type=int, help="DDPO sample_num_batches_per_epoch (default 2)")
    parser.add_argument("--train-batch", type=int, help="DDPO train_batch_size (default 4)")
    parser.add_argument("--accumulation", type=int, help="DDPO train_gradient_accumulation_steps (default 2)")
    parser.add_argument("--ap-batch", type=int, help="AlignProp train_batch_size (default 4 tiny, 2 SD 1.5)")
    parser.add_argument("--ap-accumulation", type=int, help="AlignProp train_gradient_accumulation_steps (default 2)")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs after one warm-up epoch (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per run (default 1)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every (library, workload) this many times, alternating the libraries, and add "
                             "rows of medians over the repeats (for a shared machine whose load changes)")
    parser.add_argument("--timestep-chunk", type=int, default=0,
                        help="diffrl's train_timestep_chunk (default 0: automatic; 1: one UNet call per timestep "
                             "as TRL does); TRL has no such setting")
    parser.add_argument("--trl-python", default=None,
                        help="a Python with trl==0.23.1 installed (a separate venv); TRL is skipped without it")
    parser.add_argument("--out", default=str(result_path("throughput")))
    parser.add_argument("--child", choices=["diffrl", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=WORKLOADS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mixed_precision is None:
        args.mixed_precision = "fp16" if args.device == "cuda" else "no"
    _defaults(args)
    if args.child:
        args.impl = args.child
        child(args)
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available here")

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GiB, gpu {info['gpu']}, "
          f"load average {info['load_average_at_start']}", flush=True)
    impls = [("diffrl", sys.executable)] + ([("trl", args.trl_python)] if args.trl_python else [])
    results, started = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        model = (build_sd15_random if args.sd15_random else build_tiny_sd)(Path(tmp) / "model", args.latent)
        for repeat in range(args.repeats):  # diffrl and TRL alternate, so a change of load hits both
            for workload in args.workloads:
                for impl, python in impls:
                    result = _run_child(args, impl, python, workload, model)
                    result["repeat"] = repeat
                    results.append(result)
                    if "error" not in result:
                        _print_row(result)
    if args.repeats > 1:
        results = _medians(results) + results
    print("\n" + markdown(results))
    image = args.latent * (8 if args.sd15_random else 2)
    record = {"command": " ".join([Path(sys.executable).name, "bench/throughput.py"] + (argv or sys.argv[1:])),
              "settings": {"model": "SD 1.5 architecture, random weights" if args.sd15_random
                           else "diffrl tiny Stable Diffusion", "device": args.device, "latent": args.latent,
                           "image": image, "steps": args.steps, "eta": 1.0, "guidance_scale": 5.0,
                           "precision": args.mixed_precision, "lora_rank": 4,
                           "ddpo": {"reward": "jpeg_compressibility", "sample_batch_size": args.sample_batch,
                                    "sample_num_batches_per_epoch": args.sample_batches,
                                    "train_batch_size": args.train_batch,
                                    "train_gradient_accumulation_steps": args.accumulation, "train_cfg": True,
                                    "train_timestep_fraction": 1.0,
                                    "diffrl_train_timestep_chunk": args.timestep_chunk},
                           "alignprop": {"reward": "brightness", "train_batch_size": args.ap_batch,
                                         "train_gradient_accumulation_steps": args.ap_accumulation,
                                         "steps_with_grad": 1, "gradient_checkpointing": True},
                           "timed_epochs": args.epochs, "threads": args.threads, "repeats": args.repeats},
              "machine": dict(info, load_average_at_end=os.getloadavg()), "wall_s": round(time.time() - started, 1),
              "diffrl_over_trl_epoch_s": ratios(results), "results": results}
    path = save_record(record, args.out)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
