"""The benchmark commands keep running: each on a minimal setting (diffrl only; TRL needs its own venv).

Only that they finish and record well-formed figures is checked here; the figures themselves are measured by
the commands in docs/benchmarks.md, never asserted as timings.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script: str, *args: str, out: Path) -> dict:
    done = subprocess.run([sys.executable, str(BENCH / script), *args, "--out", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_throughput_bench_records_each_phase(tmp_path):
    record = _run("throughput.py", "--workloads", "ddpo", "alignprop", "--latent", "8", "--steps", "2",
                  "--sample-batch", "2", "--sample-batches", "2", "--train-batch", "2", "--ap-batch", "1",
                  "--ap-accumulation", "1", "--epochs", "1", out=tmp_path / "throughput.json")
    assert record["command"].startswith("python bench/throughput.py") and record["machine"]["cores"] >= 1
    assert [(r["impl"], r["workload"]) for r in record["results"]] == [("diffrl", "ddpo"), ("diffrl", "alignprop")]
    for r in record["results"]:
        assert "error" not in r
        for key in ("epoch_s", "sampling_s", "training_s", "samples_per_s", "peak_memory_mb"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])


def test_alignprop_memory_bench_compares_checkpointing(tmp_path):
    record = _run("alignprop_memory.py", "--steps", "2", "--latent", "8", "--epochs", "1",
                  out=tmp_path / "alignprop_memory.json")
    assert [(r["impl"], r["checkpointing"]) for r in record["results"]] == [("diffrl", "on"), ("diffrl", "off")]
    assert all(r["epoch_s_median"] > 0 and r["peak_rss_mb"] > 0 for r in record["results"])


def test_digits_optimum_bench_draws_the_frontier_and_places_the_trainers(tmp_path):
    record = _run("digits_optimum.py", "--samples", "64", "--batch", "64", "--plot", str(tmp_path / "frontier.png"),
                  out=tmp_path / "optimum.json")
    frontier = record["frontier"]
    assert [p["beta"] for p in frontier] == sorted((p["beta"] for p in frontier), reverse=True)
    rewards = [p["reward"] for p in frontier]
    assert rewards == sorted(rewards)  # a smaller beta (less KL weight) never lowers the optimum's reward
    assert all(p["kl"] >= -1e-9 and 1 <= p["ess"] <= 64 for p in frontier)
    assert record["placed"] and all(0 <= p["share"] <= 1 for p in record["placed"])
    from PIL import Image

    with Image.open(tmp_path / "frontier.png") as plot:  # the frontier (black) and one coloured curve per method
        colours = {c for _, c in plot.getcolors(maxcolors=1 << 16)}
    assert record["plot"] == str(tmp_path / "frontier.png") and (0, 0, 0) in colours and (20, 60, 200) in colours


def test_flow_gpu_bench_runs_its_cpu_setting(tmp_path):
    """``bench/gpu_flow.py`` (SD3.5 Medium's architecture on a GPU) keeps running: its --tiny CPU setting, the same
    policy, trainer and timing loop at the smallest size."""
    record = _run("gpu_flow.py", "--device", "cpu", "--tiny", "--epochs", "1", "--prompts", "1", "--group", "2",
                  out=tmp_path / "gpu_flow.json")
    result = record["result"]
    assert record["settings"]["tiny"] is True and result["samples_per_epoch"] == 2
    assert len(result["epoch_s_all"]) == 1 and result["epoch_s"] > 0 and result["peak_memory_gib"] is None
    assert 0 < result["trainable_params"] < result["transformer_params"]
