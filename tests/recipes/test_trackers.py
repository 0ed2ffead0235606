"""What W&B (offline) and TensorBoard really record for a run: the run folder's name, every reward component's
mean, and one image key per kind of picture with a caption (prompt and reward) per image, each epoch."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from diffrl import DDPOConfig, DDPOTrainer, DefaultDDPODDPMPipeline, rewards


def _brightness(sign: float):
    def reward(images, prompts, metadata):
        return sign * images.mean(dim=(1, 2, 3)), {}

    reward.differentiable = True
    return reward


def _train(tiny_ddpm_path, tmp_path, tracker: str) -> Path:
    reward = rewards.load("combined", components=[
        {"reward": _brightness(1.0), "key": "bright", "weight": 2.0},
        {"reward": _brightness(-1.0), "key": "dark", "weight": 1.0}])
    config = DDPOConfig(num_epochs=2, sample_num_steps=3, sample_batch_size=2, sample_num_batches_per_epoch=2,
                        train_batch_size=2, mixed_precision="no", logdir=str(tmp_path / "logs"), run_name="my-run",
                        seed=1, eval_every=1, eval_num_samples=4, log_with=tracker)
    DDPOTrainer(config, reward, lambda: ("a red cat", {}), DefaultDDPODDPMPipeline(tiny_ddpm_path)).train()
    return tmp_path / "logs" / "my-run"


def _wandb_records(path: Path) -> list:
    """The protobuf records of a ``run-<id>.wandb`` file: LevelDB's log format (32 KiB blocks of records with a
    7-byte header: crc32, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) after W&B's 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    raw, block, position, pending, records = path.read_bytes(), 32768, 7, b"", []
    while position + 7 <= len(raw):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", raw[position:position + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and length == 0):
            position += left  # block trailer / padding
            continue
        if position + 7 + length > len(raw):
            break  # still being written
        pending += raw[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _finished_wandb_run(folder: Path, timeout: float = 60.0) -> list:
    """The records of the one offline run under ``folder`` once its exit record is written: wandb-core writes
    the file in its own process and may still be flushing when ``finish()`` has returned."""
    deadline = time.monotonic() + timeout
    while True:
        files = list(folder.glob("wandb/offline-run-*/run-*.wandb"))
        records = _wandb_records(files[0]) if len(files) == 1 else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            assert len(files) == 1, f"expected one offline W&B run under {folder}, found {files}"
            return records
        time.sleep(0.2)


def test_wandb_offline_records_components_captions_and_the_run_name(tiny_ddpm_path, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    _train(tiny_ddpm_path, tmp_path, "wandb")
    records = _finished_wandb_run(tmp_path)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, run.project) == ("my-run", "diffrl")
    rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    metrics = [row for row in rows if "reward/bright/mean" in row]
    assert len(metrics) == 2 and all(row["reward/dark/mean"] == pytest.approx(-row["reward/bright/mean"])
                                     for row in metrics)
    batches = [row for row in rows if "samples/last_batch/captions" in row]
    evals = [row for row in rows if "eval/samples/captions" in row]
    assert len(batches) == 2 and len(evals) == 2  # one key per kind of picture, once per epoch
    assert not [key for row in rows for key in row if "cat" in key]  # no key made of a prompt
    for row in batches:
        assert row["samples/last_batch/count"] == 2
        for caption in row["samples/last_batch/captions"]:
            prompt, _, value = caption.partition(" | reward ")
            assert prompt == "a red cat" and 0 < float(value) < 1
    assert len(evals[0]["eval/samples/captions"]) == 4


def test_tensorboard_records_components_captions_in_the_run_folder(tiny_ddpm_path, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = _train(tiny_ddpm_path, tmp_path, "tensorboard")
    (events,) = run_dir.glob("*/events.out.tfevents.*")  # inside the run folder <logdir>/my-run/
    log = EventAccumulator(str(events.parent), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    log.Reload()
    tags = log.Tags()
    assert {"reward/bright/mean", "reward/dark/mean", "eval/bright/mean"} <= set(tags["scalars"])
    assert [e.step for e in log.Scalars("reward/bright/mean")] == [2, 4]
    assert sorted(tags["images"]) == ["eval/samples", "samples/last_batch"]
    assert [e.step for e in log.Images("samples/last_batch")] == [0, 2]
    captions = [e.tensor_proto.string_val[0].decode() for e in log.Tensors("samples/last_batch/captions/text_summary")]
    assert len(captions) == 2
    for text in captions:
        lines = text.splitlines()
        assert len(lines) == 2 and all(line.split(". ", 1)[1].startswith("a red cat | reward 0.") for line in lines)
