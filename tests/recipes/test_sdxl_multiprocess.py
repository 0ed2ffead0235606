"""Two CPU processes (gloo) train DDPO on the tiny SDXL: the weights stay identical and the result is an SDXL LoRA."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from diffrl.testing.sdxl import save_tiny_sdxl

JOB = Path(__file__).with_name("two_process_sdxl_job.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddpo_on_sdxl_keeps_the_weights_identical(tmp_path):
    model = save_tiny_sdxl(tmp_path / "tiny-sdxl")
    logdir = tmp_path / "logs"
    # Without GPUs, accelerate's multi-process launcher plus diffrl's gloo fallback gives two CPU processes.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(JOB), str(model), str(logdir),
           "num_epochs=2", "sample_num_steps=2", "sample_batch_size=2", "sample_num_batches_per_epoch=1",
           "train_batch_size=1", "train_learning_rate=0.01", "train_clip_range=0.2", "negative_prompts=blurry",
           "sample_guidance_scale=4.0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert (logdir / "weights_1.json").is_file(), out.stdout[-3000:] + out.stderr[-6000:]
    ranks = [json.loads((logdir / f"weights_{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["num_processes"] == 2
    assert ranks[0]["global_step"] == ranks[1]["global_step"] > 0
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=0, abs=1e-9)  # gradients synchronised
    first = json.loads((logdir / "mp" / "metrics.jsonl").read_text().splitlines()[0])
    # The processes sampled their own images (different noise): equal rewards would mean no data parallelism.
    assert ranks[0]["rewards"] != ranks[1]["rewards"]
    assert len(ranks[0]["rewards"]) == len(ranks[1]["rewards"]) == 4
    assert first["reward/mean"] == pytest.approx(sum(ranks[0]["rewards"][:2] + ranks[1]["rewards"][:2]) / 4, abs=1e-5)
    final = logdir / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((final / "diffrl_model.json").read_text())["kind"] == "sdxl"
