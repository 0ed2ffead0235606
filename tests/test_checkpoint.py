"""Atomic checkpoint saving, rotation, finding the checkpoint to resume, RNG state."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from diffrl import checkpoint as ckpt
from diffrl.checkpoint import (
    MARKER,
    NoCheckpointError,
    checkpoint_dir,
    find_latest,
    load_rng_state,
    read_state,
    rotate,
    save_atomically,
    save_rng_state,
)


def write_weights(value: str):
    def write(folder: Path) -> None:
        (folder / "weights.txt").write_text(value)
        (folder / "optimizer").mkdir()
        (folder / "optimizer" / "state.txt").write_text(value)

    return write


def save(root: Path, epoch: int, value: str = "w") -> Path:
    return save_atomically(root / f"checkpoint_{epoch}", write_weights(f"{value}{epoch}"), {"epoch": epoch})


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_checkpoint_dir_layout() -> None:
    assert checkpoint_dir("logs", "run1") == Path("logs/run1/checkpoints")
    for bad in ("", "a/b", ".."):
        with pytest.raises(ValueError, match="run_name"):
            checkpoint_dir("logs", bad)


def test_save_writes_files_and_marker_and_leaves_no_temp(tmp_path: Path) -> None:
    root = checkpoint_dir(tmp_path, "run")
    target = save_atomically(root / "checkpoint_3", write_weights("a"), {"epoch": 3, "global_step": 12})
    assert target == root / "checkpoint_3"
    assert entries(target) == [MARKER, "optimizer", "weights.txt"]
    assert read_state(target) == {"epoch": 3, "global_step": 12}
    assert entries(root) == ["checkpoint_3"]


def test_failed_write_leaves_nothing_resumable_and_keeps_the_previous(tmp_path: Path) -> None:
    root = tmp_path / "run" / "checkpoints"
    previous = save(root, 1)

    def crash(folder: Path) -> None:
        (folder / "weights.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_atomically(root / "checkpoint_2", crash, {"epoch": 2})
    with pytest.raises(RuntimeError):
        save_atomically(root / "checkpoint_1", crash, {"epoch": 1})  # replacing an existing one
    assert entries(root) == ["checkpoint_1"]
    assert find_latest(tmp_path / "run") == previous
    assert (previous / "weights.txt").read_text() == "w1" and read_state(previous) == {"epoch": 1}


def test_killed_process_mid_save_leaves_nothing_resumable(tmp_path: Path) -> None:
    root = tmp_path / "run" / "checkpoints"
    previous = save(root, 1)
    script = textwrap.dedent(f"""
        import os
        from diffrl.checkpoint import save_atomically
        def write(folder):
            (folder / "weights.txt").write_text("half")
            os._exit(9)  # killed: no cleanup, no exception handling
        save_atomically({str(root / "checkpoint_2")!r}, write, {{"epoch": 2}})
    """)
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 9
    leftovers = [name for name in entries(root) if name.startswith(".checkpoint_2.tmp-")]
    assert len(leftovers) == 1  # the half-written temp folder is there ...
    assert find_latest(tmp_path / "run") == previous  # ... and invisible to resume
    save(root, 3)
    assert entries(root) == sorted([*leftovers, "checkpoint_1", "checkpoint_3"])
    assert rotate(root, keep=1) == [root / "checkpoint_1"]
    assert entries(root) == sorted([*leftovers, "checkpoint_3"])  # another process's temp folder is kept


@pytest.mark.parametrize("atomic_swap", [True, False])
def test_replacing_a_checkpoint_of_the_same_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, atomic_swap: bool
) -> None:
    if not atomic_swap:
        monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    root = tmp_path / "checkpoints"
    save(root, 5, "old")
    target = save(root, 5, "new")
    assert (target / "weights.txt").read_text() == "new5"
    assert (target / "optimizer" / "state.txt").read_text() == "new5"
    assert entries(root) == ["checkpoint_5"]


def test_exchange_swaps_two_folders_when_supported(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    if not ckpt._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here; the two-rename fallback is tested above")
    assert entries(tmp_path / "b") == ["x"] and entries(tmp_path / "a") == []


def test_rotate_keeps_the_newest_by_epoch_number(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for epoch in (1, 2, 9, 10, 11):
        save(root, epoch)
    (root / ".checkpoint_12.tmp-4242").mkdir()  # another process's save in progress
    (root / "checkpoint_0").mkdir()  # incomplete and older than every kept one
    (root / "checkpoint_99").mkdir()  # incomplete but newer: not ours to judge
    removed = rotate(root, keep=2)
    assert sorted(p.name for p in removed) == ["checkpoint_0", "checkpoint_1", "checkpoint_2", "checkpoint_9"]
    assert entries(root) == [".checkpoint_12.tmp-4242", "checkpoint_10", "checkpoint_11", "checkpoint_99"]
    assert rotate(root, keep=2) == []
    with pytest.raises(ValueError, match="keep"):
        rotate(root, keep=0)


def test_rotate_spares_protected_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for epoch in range(1, 6):
        save(root, epoch)
    rotate(root, keep=2, protect=[root / "checkpoint_2"])
    assert entries(root) == ["checkpoint_2", "checkpoint_4", "checkpoint_5"]


def test_find_latest_accepts_run_checkpoints_or_checkpoint_folder(tmp_path: Path) -> None:
    run = tmp_path / "logs" / "run"
    root = checkpoint_dir(tmp_path / "logs", "run")
    for epoch in (2, 10, 3):
        save(root, epoch)
    (root / "checkpoint_11").mkdir()  # a save without its marker: incomplete
    assert find_latest(run) == root / "checkpoint_10"
    assert find_latest(root) == root / "checkpoint_10"
    assert find_latest(root / "checkpoint_3") == root / "checkpoint_3"
    with pytest.raises(NoCheckpointError, match=r"checkpoint_11: the checkpoint is incomplete"):
        find_latest(root / "checkpoint_11")


def test_find_latest_names_the_path_when_nothing_is_resumable(tmp_path: Path) -> None:
    with pytest.raises(NoCheckpointError, match=f"cannot resume from {tmp_path / 'nope'}: it does not exist"):
        find_latest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoCheckpointError, match=f"cannot resume from {tmp_path / 'empty'}: no complete"):
        find_latest(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NoCheckpointError, match="is a file"):
        find_latest(tmp_path / "file.txt")


def test_rng_state_round_trips_through_torch_save() -> None:
    state = save_rng_state()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=True)

    def draw() -> tuple:
        return random.random(), np.random.standard_normal(3).tolist(), torch.randn(3).tolist()

    first = draw()
    load_rng_state(restored)
    assert draw() == first


def test_temp_dir_tag_lets_processes_share_one_save(tmp_path: Path) -> None:
    target = tmp_path / "checkpoints" / "checkpoint_4"
    assert ckpt.temp_dir_for(target).name == f".checkpoint_4.tmp-{os.getpid()}"
    shared = ckpt.temp_dir_for(target, tag="epoch4")
    shared.mkdir(parents=True)
    (shared / "rank1.txt").write_text("1")  # written by another rank before the main one commits
    ckpt.commit(shared, target, {"epoch": 4})
    assert entries(target) == [MARKER, "rank1.txt"] and find_latest(target) == target


def test_write_text_atomically_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "report.html"
    ckpt.write_text_atomically(target, "first")
    assert target.read_text() == "first"

    def full_disk(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ckpt.write_text_atomically(target, "second")
    monkeypatch.undo()
    assert target.read_text() == "first" and sorted(p.name for p in target.parent.iterdir()) == ["report.html"]
