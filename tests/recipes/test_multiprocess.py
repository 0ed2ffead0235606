import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

JOB = Path(__file__).with_name("two_process_job.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DATA_PARALLEL = ("--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")


def _command(trainer, model, logdir, *overrides, launcher=DATA_PARALLEL):
    # On a machine without GPUs, accelerate's multi-process launcher plus diffrl's gloo fallback (see
    # diffrl.recipes.accelerator.use_cpu_processes_without_gpus) gives two CPU processes.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
           "--main_process_port", str(_free_port()), str(JOB), trainer, model, str(logdir), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", CUDA_VISIBLE_DEVICES="")
    return cmd, env


def _start(trainer, model, logdir, *overrides, launcher=DATA_PARALLEL):
    cmd, env = _command(trainer, model, logdir, *overrides, launcher=launcher)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every process under it (torch's launcher starts its workers in their own groups)."""
    import psutil

    root = psutil.Process(pid)
    for process in [*root.children(recursive=True), root]:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _launch(trainer, model, logdir, *overrides, timeout=400, launcher=DATA_PARALLEL):
    cmd, env = _command(trainer, model, logdir, *overrides, launcher=launcher)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    ranks = [json.loads((Path(logdir) / f"weights_{r}.json").read_text()) for r in (0, 1)]
    return ranks, out


def test_two_process_ddpo_trains_in_sync_and_saves_without_hanging(tiny_ddpm_path, tmp_path):
    ranks, _ = _launch("ddpo", tiny_ddpm_path, tmp_path / "logs", "num_epochs=2", "sample_num_steps=3",
                       "sample_batch_size=2", "sample_num_batches_per_epoch=1", "train_batch_size=1",
                       "train_learning_rate=0.01", "train_clip_range=0.2", "prompts=fixed",
                       "prompt_options.prompts=[p0, p1, p2, p3, p4, p5, p6, p7]", "prompt_options.order=cycle")
    assert ranks[0]["num_processes"] == 2
    # the built-in source, built as diffrl train builds it, gives each process its own share of the stream:
    # process r scores positions r, r + 2, ... (2 epochs x 2 samples each), so together they cover p0..p7 once
    assert ranks[0]["scored_prompts"] == ["p0", "p2", "p4", "p6"]
    assert ranks[1]["scored_prompts"] == ["p1", "p3", "p5", "p7"]
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=0, abs=1e-9)  # gradients synchronised
    assert ranks[0]["global_step"] == ranks[1]["global_step"] > 0
    run = tmp_path / "logs" / "mp"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint_0", "checkpoint_1"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in (run / "checkpoints" / "checkpoint_1").iterdir()}
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # logged once, by the main process
    assert (tmp_path / "logs" / "final" / "adapter_model.safetensors").is_file()


def test_two_process_grpo_keeps_groups_whole_and_weights_in_sync(tiny_ddpm_path, tmp_path):
    # One group of 4 samples split over the two processes: its statistics are gathered, the weights stay equal.
    ranks, _ = _launch("grpo", tiny_ddpm_path, tmp_path / "logs", "num_epochs=2", "sample_num_steps=3",
                       "group_size=4", "prompts_per_epoch=1", "train_batch_size=1", "sde_window_size=2",
                       "train_learning_rate=0.01", "train_clip_range=0.2")
    assert ranks[0]["num_processes"] == 2
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=0, abs=1e-9)
    assert ranks[0]["global_step"] == ranks[1]["global_step"] > 0
    assert len((tmp_path / "logs" / "mp" / "metrics.jsonl").read_text().splitlines()) == 2


def test_two_process_grpo_on_the_flow_model_keeps_weights_identical(tiny_sd3_path, tmp_path):
    """GRPO with the reference KL on the tiny SD3 (a flow-matching transformer, Flow-GRPO's SDE): two processes,
    each its own prompts and noise, end with identical adapters and one metrics line per epoch."""
    ranks, _ = _launch("grpo", tiny_sd3_path, tmp_path / "logs", "num_epochs=2", "sample_num_steps=3",
                       "group_size=2", "prompts_per_epoch=2", "train_batch_size=1", "kl_coef=0.1",
                       "train_learning_rate=0.01", "sample_eta=0.7", "prompts=simple_animals")
    assert ranks[0]["num_processes"] == 2 and ranks[0]["module_class"] == "SD3Transformer2DModel"
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=0, abs=1e-9)
    assert ranks[0]["global_step"] == ranks[1]["global_step"] > 0
    assert ranks[0]["scored_prompts"] != ranks[1]["scored_prompts"]  # each process its own share of the prompts
    assert len((tmp_path / "logs" / "mp" / "metrics.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "logs" / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_two_process_dgpo_keeps_weights_identical(tiny_ddpm_path, tmp_path):
    """DGPO on two processes: each its own samples and groups (whole groups never straddle processes), the frozen
    reference and the KL term, identical weights at the end."""
    ranks, _ = _launch("dgpo", tiny_ddpm_path, tmp_path / "logs", "num_epochs=2", "sample_num_steps=3",
                       "sample_batch_size=4", "sample_num_batches_per_epoch=1", "group_size=2", "train_batch_size=2",
                       "train_lora=false", "nft_kl_coef=0.1", "dgpo_beta=10", "train_learning_rate=0.001")
    assert ranks[0]["num_processes"] == 2
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=0, abs=1e-9)
    assert ranks[0]["global_step"] == ranks[1]["global_step"] > 0
    assert len((tmp_path / "logs" / "mp" / "metrics.jsonl").read_text().splitlines()) == 2


FSDP = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "fsdp.yaml"
SHARDED_COMMON = ("sample_num_steps=3", "train_batch_size=1", "train_learning_rate=0.001", "train_clip_range=0.2",
                  "train_lora=false")


def _whole_unet(run_dir: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    weights = load_file(run_dir / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    return torch.cat([weights[k].flatten() for k in sorted(weights)])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _assert_sharded(ranks) -> None:
    """Each process holds DTensor shards of the trained UNet (FSDP2), about half of its elements."""
    for rank in ranks:
        assert rank["module_class"] == "FSDPUNet2DModel" and rank["param_types"] == ["DTensor"]
        assert 0.4 < rank["local_numel"] / rank["whole_numel"] < 0.6
    assert sum(rank["local_numel"] for rank in ranks) >= ranks[0]["whole_numel"]


def test_fsdp2_shards_ddpo_on_cpu_processes_and_ends_as_data_parallel(tiny_ddpm_path, tmp_path):
    """configs/accelerate/fsdp.yaml on two CPU processes: diffrl shards the UNet itself (accelerate would fall back
    to unsharded MULTI_CPU) and full fine-tuning ends with the data-parallel run's weights."""
    args = (*SHARDED_COMMON, "num_epochs=2", "sample_batch_size=2", "sample_num_batches_per_epoch=1")
    _launch("ddpo", tiny_ddpm_path, tmp_path / "dp", *args)
    ranks, _ = _launch("ddpo", tiny_ddpm_path, tmp_path / "fsdp", *args, launcher=("--config_file", str(FSDP)))
    _assert_sharded(ranks)
    dp, fsdp = _whole_unet(tmp_path / "dp"), _whole_unet(tmp_path / "fsdp")
    base = _whole_unet_from(tiny_ddpm_path)
    assert (dp - base).abs().max() > 1e-3  # trained
    assert _relative(fsdp, dp) < 1e-4
    logged = [(tmp_path / run / "mp" / "metrics.jsonl").read_text().splitlines() for run in ("dp", "fsdp")]
    assert [json.loads(x)["reward/mean"] for x in logged[0]] == [json.loads(x)["reward/mean"] for x in logged[1]]


def _whole_unet_from(model: str) -> torch.Tensor:
    from safetensors.torch import load_file

    weights = load_file(Path(model) / "unet" / "diffusion_pytorch_model.safetensors")
    return torch.cat([weights[k].flatten() for k in sorted(weights)])


def test_fsdp2_grpo_with_reference_kl_matches_data_parallel_and_resumes_after_a_kill(tiny_ddpm_path, tmp_path):
    """GRPO's reference (a sharded snapshot swapped in for the KL forward) works through the shards: the same
    KL and weights as data parallel; a sharded run killed (SIGKILL) after a checkpoint and resumed ends with the
    uninterrupted run's weights exactly."""
    args = (*SHARDED_COMMON, "group_size=4", "prompts_per_epoch=1", "sde_window_size=2", "kl_coef=0.5")
    _launch("grpo", tiny_ddpm_path, tmp_path / "dp", *args, "num_epochs=3")
    ranks, _ = _launch("grpo", tiny_ddpm_path, tmp_path / "fsdp", *args, "num_epochs=3",
                       launcher=("--config_file", str(FSDP)))
    _assert_sharded(ranks)
    assert _relative(_whole_unet(tmp_path / "fsdp"), _whole_unet(tmp_path / "dp")) < 1e-4
    rows = [[json.loads(x) for x in (tmp_path / run / "mp" / "metrics.jsonl").read_text().splitlines()]
            for run in ("dp", "fsdp")]
    assert [r["stats/kl_ref"] for r in rows[1]] == pytest.approx([r["stats/kl_ref"] for r in rows[0]], rel=1e-4)
    assert rows[1][-1]["stats/kl_ref"] > 0

    killed = tmp_path / "killed"
    process = _start("grpo", tiny_ddpm_path, killed, *args, "num_epochs=3", launcher=("--config_file", str(FSDP)))
    try:
        deadline = time.monotonic() + 300
        while not list((killed / "mp" / "checkpoints").glob("checkpoint_*/diffrl_state.json")):
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before a checkpoint"
            time.sleep(0.05)
    finally:  # what a preemption does: every process of the run dies at once, the launcher and its workers
        _kill_tree(process.pid)
        process.wait()
    _launch("grpo", tiny_ddpm_path, killed, *args, "num_epochs=3", f"resume_from={killed / 'mp'}",
            launcher=("--config_file", str(FSDP)))
    (record,) = (killed / "mp").glob("config.resume-*.yaml")  # it resumed, from this epoch's checkpoint
    assert int(record.stem.rpartition("-")[2]) < 2, "killed too late to train after the resume; nothing was tested"
    assert torch.equal(_whole_unet(killed), _whole_unet(tmp_path / "fsdp"))
    epochs = [json.loads(x)["epoch"] for x in (killed / "mp" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]  # no epoch lost or logged twice


def test_the_sharding_check_reads_what_the_launcher_asked_for(monkeypatch):
    from diffrl.recipes.accelerator import ShardingUnavailableError, check_requested_sharding

    check_requested_sharding("MULTI_CPU")  # nothing asked: nothing to refuse
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    check_requested_sharding("DEEPSPEED")
    with pytest.raises(ShardingUnavailableError, match="asked for DEEPSPEED .* set up NO"):
        check_requested_sharding("NO")


RANK_REWARD = '''
import json, os

def brightness(images, prompts, prompt_metadata):
    with open(os.path.join(os.environ["SCORED_DIR"], f"scored_{os.environ['RANK']}.jsonl"), "a") as f:
        f.write(json.dumps(list(prompts)) + "\\n")
    return images.mean(dim=(1, 2, 3)), {}
'''


def test_two_machines_start_with_the_same_command_from_the_environment(tiny_ddpm_path, tmp_path):
    """scripts/launch.sh on two "machines" (NODE_RANK 0 and 1 on this host): one run, each node scoring its own
    share of the prompts, one metrics file and one final model."""
    root = Path(__file__).resolve().parents[2]
    (tmp_path / "rank_reward.py").write_text(RANK_REWARD)
    port = _free_port()
    args = [f"model={tiny_ddpm_path}", "reward=rank_reward:brightness", "prompts=fixed",
            "prompt_options.prompts=[p0, p1, p2, p3]", "prompt_options.order=cycle", "num_epochs=2",
            "sample_num_steps=2", "sample_batch_size=2", "sample_num_batches_per_epoch=1", "train_batch_size=2",
            "mixed_precision=no", f"logdir={tmp_path / 'logs'}", "run_name=mn"]
    env = dict(os.environ, NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", SCORED_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    nodes = [subprocess.Popen(["bash", str(root / "scripts" / "launch.sh"), *args], env=dict(env, NODE_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outputs = [node.communicate(timeout=400) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    scored = {r: [json.loads(line) for line in (tmp_path / f"scored_{r}.jsonl").read_text().splitlines()]
              for r in (0, 1)}
    assert scored[0] == [["p0", "p2"], ["p0", "p2"]] and scored[1] == [["p1", "p3"], ["p1", "p3"]]
    run = tmp_path / "logs" / "mn"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2 and (run / "final").is_dir()


def test_two_processes_stop_together_when_a_guard_fires(tiny_ddpm_path, tmp_path):
    """Only the main process evaluates; its stop_below verdict reaches the other process (no hang, no extra
    epoch on one side)."""
    ranks, out = _launch("ddpo", tiny_ddpm_path, tmp_path / "logs", "num_epochs=3", "sample_num_steps=2",
                         "sample_batch_size=2", "sample_num_batches_per_epoch=1", "train_batch_size=1",
                         "eval_every=1", "eval_num_samples=4", "stop_below={eval/diversity: 10.0}")
    assert ranks[0]["global_step"] == ranks[1]["global_step"] > 0
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=0, abs=1e-9)
    assert len((tmp_path / "logs" / "mp" / "metrics.jsonl").read_text().splitlines()) == 1
    assert "stopped after epoch 0: eval/diversity=" in out.stdout


def test_the_main_job_runs_sharded_with_the_fsdp_config(tmp_path):
    """The README's main job launched with configs/accelerate/fsdp.yaml on two CPU processes: evaluations before
    and after training sample on both processes (a sharded forward is collective), the checkpoint holds the
    gathered optimizer state that only a sharded run writes, and the result loads in plain diffusers."""
    from diffusers import DDPMPipeline

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP), "--num_processes", "2",
           "--main_process_port", str(_free_port()), "-m", "diffrl", "train", "num_epochs=1", "eval_num_samples=32",
           f"logdir={tmp_path}", "run_name=sharded"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    run = tmp_path / "sharded"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_samples"] == 32 and summary["reward_before"] < 0
    assert (run / "checkpoints" / "checkpoint_0" / "optimizer_full.pt").is_file()  # written by the FSDP2 path only
    assert (run / "report.html").is_file()
    DDPMPipeline.from_pretrained(run / "final")


@pytest.mark.slow
@pytest.mark.parametrize("trainer,extra", [
    ("nft", ("sample_batch_size=2", "sample_num_batches_per_epoch=1", "nft_kl_coef=0.1")),
    ("awm", ("sample_batch_size=2", "sample_num_batches_per_epoch=1", "group_size=2", "awm_clip_range=0.01",
             "awm_kl_old_coef=1.0")),
    ("dgpo", ("sample_batch_size=2", "sample_num_batches_per_epoch=1", "group_size=2", "train_batch_size=2",
              "nft_kl_coef=0.1", "dgpo_beta=10")),
    ("alignprop", ("train_batch_size=2", "truncated_backprop_rand=false", "truncated_backprop_timestep=1")),
    ("ddpo", ("sample_batch_size=2", "sample_num_batches_per_epoch=1", "train_clip_range=0.2", "train_lora=true")),
])
def test_every_trainer_under_fsdp2_ends_as_data_parallel(tiny_ddpm_path, tmp_path, trainer, extra):
    """The other trainers (and LoRA) through the same sharded path, against data parallel (opt-in: -m slow)."""
    args = ("num_epochs=2", "sample_num_steps=3", "train_batch_size=1", "train_learning_rate=0.001",
            "train_lora=false", *extra)
    _launch(trainer, tiny_ddpm_path, tmp_path / "dp", *args)
    ranks, _ = _launch(trainer, tiny_ddpm_path, tmp_path / "fsdp", *args, launcher=("--config_file", str(FSDP)))
    assert all(rank["param_types"] == ["DTensor"] for rank in ranks)
    lora = "train_lora=true" in extra
    if lora:
        from safetensors.torch import load_file

        a, b = (load_file(tmp_path / run / "final" / "adapter_model.safetensors") for run in ("dp", "fsdp"))
        dp, fsdp = (torch.cat([x[k].flatten() for k in sorted(x)]) for x in (a, b))
    else:
        dp, fsdp = _whole_unet(tmp_path / "dp"), _whole_unet(tmp_path / "fsdp")
    assert _relative(fsdp, dp) < 1e-4
