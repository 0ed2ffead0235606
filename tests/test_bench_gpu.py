"""The GPU benchmark keeps running: its CPU setting end to end, its FLOP bookkeeping, and the accelerate configs.

No timing is asserted. ``bench/gpu.py --device cpu --tiny`` runs the same driver, children, FLOP counting and
smoke-run script as ``bash bench/gpu.sh`` does on a GPU, at the smallest sizes, diffrl only.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
CONFIGS = ROOT / "configs" / "accelerate"
sys.path.insert(0, str(BENCH))

import gpu  # noqa: E402  (bench/gpu.py: the benchmark scripts import each other as top-level modules)
from gpu_flops import bf16_peak_tflops  # noqa: E402


def test_cpu_run_writes_every_row_and_the_smoke_run(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--device", "cpu", "--tiny", "--epochs", "1",
                           "--skip-trl", "--workloads", "ddpo", "grpo", "nft", "--sharded-cases", "ddpo-full",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert {"command", "settings", "gpu", "flops", "machine", "results", "sharded", "markdown"} <= set(record)
    assert record["settings"]["device"] == "cpu" and record["gpu"]["bf16_peak_tflops"] is None
    flops = record["flops"]
    # A LoRA UNet's backward pass computes activation gradients (about one more forward), not weight gradients.
    assert 0 < flops["unet_forward_flops_per_row"] < flops["unet_forward_backward_flops_per_row"]
    assert flops["unet_forward_backward_flops_per_row"] < 3 * flops["unet_forward_flops_per_row"]
    rows = {(r["impl"], r["workload"]): r for r in record["results"]}
    assert set(rows) == {(i, w) for i in ("diffrl", "trl") for w in ("ddpo", "grpo", "nft")}
    ddpo = rows[("diffrl", "ddpo")]
    assert "error" not in ddpo, ddpo
    for key in ("epoch_s", "samples_per_s", "peak_memory_mb", "unet_tflop_per_epoch", "achieved_tflops"):
        assert math.isfinite(ddpo[key]) and ddpo[key] > 0, (key, ddpo[key])
    assert ddpo["mfu"] is None  # no bf16 peak for a CPU
    assert rows[("trl", "ddpo")]["note"] == "not run: --skip-trl"
    for workload in ("grpo", "nft"):  # "not available" until the trainers exist, then a timed row
        row = rows[("diffrl", workload)]
        assert row.get("available") is False and row["note"].startswith("not available") or "epoch_s" in row, row
        assert rows[("trl", workload)]["note"].startswith("not available")
    [smoke] = record["sharded"]
    assert smoke["config"] == "plain" and smoke["case"] == "ddpo-full"
    assert smoke["passed"] is True, smoke
    assert smoke["checks"]["tensors_changed"] > 0 and smoke["checks"]["same_names_and_shapes"]
    assert "| ddpo | diffrl |" in record["markdown"] and out.with_suffix(".md").read_text().strip()


def test_unet_rows_per_epoch_follow_the_workload():
    args = type("Args", (), {"steps": 20})()
    # DDPO: 16 samples x 20 steps x CFG pair, sampled (forward) and trained (forward + backward).
    assert gpu.unet_rows(args, "ddpo", {"samples_per_epoch": 16}) == (640, 640)
    # AlignProp K=1: 19 steps forward only, the last one with a graph.
    assert gpu.unet_rows(args, "alignprop", {"samples_per_epoch": 4}) == (4 * 19 * 2, 8)
    counted = {"unet_rows_forward_only_per_epoch": 100.0, "unet_rows_with_graph_per_epoch": 30.0}
    assert gpu.unet_rows(args, "grpo", counted) == (100.0, 30.0)


def test_utilisation_against_the_peak():
    args = type("Args", (), {"steps": 20})()
    result = {"samples_per_epoch": 16, "epoch_s": 2.0}
    flops = {"unet_forward_flops_per_row": 1e12, "unet_forward_backward_flops_per_row": 2e12}
    gpu.add_utilisation(args, "ddpo", result, flops, peak=1000.0, matmul=800.0)
    assert result["unet_tflop_per_epoch"] == pytest.approx(640 * 1 + 640 * 2)
    assert result["achieved_tflops"] == pytest.approx(960.0)
    assert result["mfu"] == pytest.approx(0.96) and result["mfu_vs_measured_matmul"] == pytest.approx(1.2)
    failed = {"error": "exit code 1"}
    gpu.add_utilisation(args, "ddpo", failed, flops, peak=1000.0, matmul=None)
    assert failed == {"error": "exit code 1"}


@pytest.mark.parametrize(("name", "peak"), [("NVIDIA H200", 989.4), ("NVIDIA H100 80GB HBM3", 989.4),
                                            ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                                            ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                            ("Tesla T4", None), (None, None)])
def test_bf16_peak_by_device_name(name, peak):
    assert bf16_peak_tflops(name) == peak


def test_accelerate_configs_load_as_accelerate_cluster_configs():
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    ddp = ClusterConfig.from_yaml_file(str(CONFIGS / "ddp.yaml"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU and ddp.num_processes > 1
    fsdp = ClusterConfig.from_yaml_file(str(CONFIGS / "fsdp.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP
    assert fsdp.fsdp_config["fsdp_version"] == 2 and fsdp.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    zero2 = ClusterConfig.from_yaml_file(str(CONFIGS / "zero2.yaml"))
    assert zero2.distributed_type == DistributedType.DEEPSPEED and zero2.deepspeed_config["zero_stage"] == 2


def test_fsdp_config_builds_accelerates_fsdp2_plugin(monkeypatch):
    """What `accelerate launch` exports from fsdp.yaml, read back by accelerate's own FSDP plugin (which checks
    FSDP2's rules: e.g. no use_orig_params/sync_module_states, a bool reshard_after_forward)."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import FullyShardedDataParallelPlugin

    fsdp = ClusterConfig.from_yaml_file(str(CONFIGS / "fsdp.yaml")).fsdp_config
    env = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": str(fsdp["fsdp_version"]),
           "FSDP_AUTO_WRAP_POLICY": fsdp["fsdp_auto_wrap_policy"],
           "FSDP_RESHARD_AFTER_FORWARD": str(fsdp["fsdp_reshard_after_forward"]).lower(),
           "FSDP_STATE_DICT_TYPE": fsdp["fsdp_state_dict_type"],
           "FSDP_OFFLOAD_PARAMS": str(fsdp["fsdp_offload_params"]).lower(),
           "FSDP_CPU_RAM_EFFICIENT_LOADING": str(fsdp["fsdp_cpu_ram_efficient_loading"]).lower(),
           "FSDP_ACTIVATION_CHECKPOINTING": str(fsdp["fsdp_activation_checkpointing"]).lower()}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
