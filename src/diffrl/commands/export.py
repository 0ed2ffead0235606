"""``diffrl export``: a result or a training checkpoint in the format another tool loads.

* ``diffusers``: the layout diffrl saves (LoRA: ``pytorch_lora_weights.safetensors`` with the adapter's config,
  alpha included, in its metadata, for ``<Pipeline>.load_lora_weights``; full: a pipeline folder);
* ``kohya``: one LoRA ``.safetensors`` file in kohya's layout with the real alpha, for AUTOMATIC1111, ComfyUI,
  SD.Next and InvokeAI (Stable Diffusion and SDXL);
* ``merged``: the whole pipeline with the LoRA merged into the weights, a diffusers folder that loads without PEFT;
* ``single_file``: the same merged model as one original-layout ``.safetensors`` checkpoint, for AUTOMATIC1111,
  ComfyUI's checkpoint loader and diffusers' ``from_single_file`` (Stable Diffusion 1.x and SDXL).

This module imports neither torch nor diffusers at import time, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

FORMATS = ("diffusers", "kohya", "merged", "single_file")

HELP = """Export a fine-tuned result, or any training checkpoint, in the format another tool loads.

examples:
  diffrl export logs/<run> --format kohya --out my_lora.safetensors          # the run's final/ for A1111/ComfyUI
  diffrl export logs/<run>/checkpoints/checkpoint_7 --format diffusers --out lora_epoch7/
  diffrl export logs/<run>/final --format merged --out merged_pipeline/      # LoRA merged, plain diffusers folder
  diffrl export logs/<run> --format single_file --out model.safetensors     # one checkpoint file (SD 1.x, SDXL)
"""


def _export(args: argparse.Namespace) -> int:
    from diffrl.evaluate.loading import load_model  # heavy (torch): only when exporting

    out = Path(args.out)
    single = args.format in ("kohya", "single_file")
    if single and out.suffix != ".safetensors":
        raise ValueError(f"--out {args.out}: --format {args.format} writes one file; give a path ending in .safetensors")
    if not single and out.suffix:
        raise ValueError(f"--out {args.out}: --format {args.format} writes a folder; give a folder path")
    if out.exists() and not args.overwrite and (out.is_file() or any(out.iterdir())):
        raise ValueError(f"--out {args.out} exists and is not empty; choose another path or pass --overwrite")
    loaded = load_model(args.source, base=args.base, strict_base=False)
    policy = loaded.policy
    if args.format == "kohya":
        policy.save_kohya_lora(out)
    elif args.format == "merged":
        policy.save_merged(out)
    elif args.format == "single_file":
        policy.save_single_file(out)
    else:
        policy.save_pretrained(out)
    what = f"LoRA rank {policy.lora.rank}, alpha {policy.lora.alpha:g}" if policy.use_lora else "full weights"
    print(f"exported {args.source} ({what}) as {args.format}: {out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    try:
        return _export(args)
    except (ValueError, OSError) as err:  # ModelLoadError, EvaluationError, a format the result has not
        print(f"diffrl export: error: {err}", file=sys.stderr)
        return 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``diffrl export`` to an argparse ``subparsers`` object."""
    parser = subparsers.add_parser("export", help="write a result or checkpoint for diffusers, ComfyUI, A1111",
                                   description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE",
                        help="a diffrl result (final/, best/), a run folder (its final/) or a training checkpoint "
                             "(RUN/checkpoints/checkpoint_N)")
    parser.add_argument("--format", choices=FORMATS, required=True,
                        help="diffusers (load_lora_weights / from_pretrained), kohya (one LoRA file for A1111, "
                             "ComfyUI), merged (the pipeline with the LoRA merged in)")
    parser.add_argument("--out", required=True, help="the file (kohya) or folder (diffusers, merged) to write")
    parser.add_argument("--base", default=None, help="the base model of a LoRA result, when the recorded one has "
                                                     "moved (default: the base it records)")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty --out")
    parser.set_defaults(func=_run)
    return parser
