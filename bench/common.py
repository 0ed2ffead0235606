"""What the benchmarks share: a description of the machine, memory readings, and the tiny Stable Diffusion.

The benchmark scripts run as ``python bench/<name>.py``, so this folder is on ``sys.path`` and they
``import common``; their child processes (TRL's among them) import it the same way, so nothing here imports
diffrl at module level.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def versions() -> dict:
    """Versions of the libraries this process runs with (the TRL venv's differ from diffrl's)."""
    out = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "trl", "diffrl"):
        try:
            out[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            out[name] = None
    return out


def machine() -> dict:
    """CPU model, cores, RAM, GPU, Python, torch/diffusers versions and load average of this machine."""
    import torch

    cpu, ram_gb = "unknown", None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    libraries = {k: v for k, v in versions().items() if k not in ("trl", "diffrl")}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram_gb, "gpu": gpu, "python": platform.python_version(),
            "platform": platform.platform(), **libraries, "load_average_at_start": os.getloadavg()}


def rss_mb() -> float:
    """Resident memory of this process now, in MB (Linux)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """High-water mark of this process's resident memory, in MB (``ru_maxrss`` is in kilobytes on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_tiny_sd(directory: Path, latent: int) -> Path:
    """diffrl's tiny Stable Diffusion, sampling at ``latent`` x ``latent`` latents (the same weights, any size)."""
    from diffrl.testing.models import build_tiny_stable_diffusion
    from diffrl.testing.tokenizer import make_clip_tokenizer

    pipe = build_tiny_stable_diffusion(0)
    pipe.unet.register_to_config(sample_size=latent)
    pipe.vae.register_to_config(sample_size=latent * 2)
    pipe.save_pretrained(directory)
    # vocab.json/merges.txt beside tokenizer.json: TRL's transformers 4.x loads the slow CLIPTokenizer from them.
    make_clip_tokenizer(directory / "tokenizer", model_max_length=pipe.tokenizer.model_max_length)
    return directory


def command_line(argv: list[str] | None = None) -> str:
    """How this benchmark was started, as one would type it from the project root: ``python bench/<name>.py ...``."""
    script = Path(sys.argv[0]).name
    return " ".join(["python", f"bench/{script}", *(sys.argv[1:] if argv is None else argv)])


def result_path(benchmark: str) -> Path:
    """``bench/results/<benchmark>/<date>-<commit>.json``: today's date and the checkout's short commit (with
    ``-dirty`` when the tree has uncommitted changes), so every record names the code it measured; ``-2``, ``-3``,
    ... after it when that record already exists (never overwritten)."""
    root = RESULTS.parent.parent

    def git(*words: str) -> str:
        try:
            return subprocess.run(["git", *words], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short", "HEAD") or "nogit"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    stem = RESULTS / benchmark / f"{datetime.date.today().isoformat()}-{commit}"
    path, n = stem.with_suffix(".json"), 2
    while path.exists():  # a second run at the same commit and date keeps the first one's record
        path, n = stem.parent / f"{stem.name}-{n}.json", n + 1
    return path


def save_record(record: dict, out: str | os.PathLike) -> Path:
    """Write a benchmark's record (command, settings, machine, results) as JSON to ``out``; returns the path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path
