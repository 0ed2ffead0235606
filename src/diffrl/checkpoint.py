"""Checkpoint folders that are either complete or invisible to resume.

Layout: ``<logdir>/<run_name>/checkpoints/checkpoint_<epoch>/``. A checkpoint is
written into a hidden sibling ``.checkpoint_<epoch>.tmp-<tag>``, finished with the
marker file ``diffrl_state.json`` (written last), flushed to disk, and only then
renamed into place. A crash at any moment leaves either no ``checkpoint_<epoch>``
or a complete one; hidden folders are never resumed from.

The helpers here only touch the filesystem and the RNGs; what goes into a
checkpoint is the trainers' business (``write_fn``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CHECKPOINTS_SUBDIR",
    "MARKER",
    "NoCheckpointError",
    "checkpoint_dir",
    "checkpoint_name",
    "commit",
    "find_latest",
    "is_complete",
    "list_checkpoints",
    "load_rng_state",
    "read_state",
    "rotate",
    "save_atomically",
    "save_rng_state",
    "temp_dir_for",
    "remove_stale_temporaries",
    "write_folder_atomically",
    "write_text_atomically",
]

MARKER = "diffrl_state.json"
"""Written last into a checkpoint; a folder without it is not a checkpoint."""

CHECKPOINTS_SUBDIR = "checkpoints"
FORMAT = "diffrl-checkpoint"
FORMAT_VERSION = 1
_NAME = re.compile(r"^checkpoint_(\d+)$")


class NoCheckpointError(FileNotFoundError):
    """Nothing resumable at the given path."""


def checkpoint_dir(logdir: str | os.PathLike[str], run_name: str) -> Path:
    """The folder holding a run's checkpoints: ``<logdir>/<run_name>/checkpoints``."""
    if not run_name or os.sep in run_name or "/" in run_name or run_name in (".", ".."):
        raise ValueError(f"run_name must be a plain, non-empty folder name, got {run_name!r}")
    return Path(logdir) / run_name / CHECKPOINTS_SUBDIR


def checkpoint_name(epoch: int) -> str:
    """``checkpoint_<epoch>``."""
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
    return f"checkpoint_{epoch}"


def _epoch_of(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a checkpoint folder whose marker was written (the save finished)."""
    return (Path(path) / MARKER).is_file()


def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The marker's contents: what the trainer passed as ``state`` (e.g. epoch, global_step)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        raise NoCheckpointError(f"{path} is not a complete checkpoint: {MARKER} is missing")
    data = json.loads(marker.read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        raise ValueError(f"{marker} is not a diffrl checkpoint marker")
    return data["state"]


# ---- atomic saving ---------------------------------------------------------------------------


def temp_dir_for(target_dir: str | os.PathLike[str], tag: str | int | None = None) -> Path:
    """The hidden sibling a save of ``target_dir`` writes into: ``.<name>.tmp-<tag>``.

    ``tag`` defaults to this process id. Processes that write parts of one checkpoint
    together (e.g. ``accelerator.save_state`` on every rank) must agree on a tag.
    """
    target = Path(target_dir)
    return target.parent / f".{target.name}.tmp-{os.getpid() if tag is None else tag}"


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` (folders too: their entries are data)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open folders (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def commit(tmp_dir: str | os.PathLike[str], target_dir: str | os.PathLike[str],
           state: Mapping[str, Any] | None = None, *, marker: bool = True) -> Path:
    """Finish a save: write the marker into ``tmp_dir`` (unless ``marker=False``: a plain folder such as a
    saved model, which must not look resumable), flush it all, rename it to ``target_dir``.

    An existing ``target_dir`` is replaced: swapped atomically where the OS can, otherwise
    moved aside to a hidden name first (a crash between the two renames then leaves the
    old checkpoint under ``.<name>.old-<pid>``, never a partial one under the real name).
    """
    tmp, target = Path(tmp_dir), Path(target_dir)
    if marker:
        data = {"format": FORMAT, "version": FORMAT_VERSION, "state": dict(state or {})}
        (tmp / MARKER).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _fsync_tree(tmp)
    if target.exists():
        if _exchange(tmp, target):
            _fsync_dir(target.parent)
            shutil.rmtree(tmp)  # now holds the old checkpoint
            return target
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    return target


def save_atomically(target_dir: str | os.PathLike[str], write_fn: Callable[[Path], Any],
                    state: Mapping[str, Any] | None = None, *, tag: str | int | None = None,
                    marker: bool = True) -> Path:
    """Save a checkpoint so that a crash never leaves a partial one where resume looks.

    ``write_fn(tmp_dir)`` writes the checkpoint's files into a fresh hidden sibling
    (:func:`temp_dir_for`); then :func:`commit` adds the marker with ``state`` (JSON data,
    e.g. ``{"epoch": 3, "global_step": 120}``) and renames it to ``target_dir``. If
    ``write_fn`` raises, the temporary folder is removed and the exception propagates;
    an earlier checkpoint at ``target_dir`` is untouched. Returns ``target_dir``.
    """
    target = Path(target_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_for(target, tag)
    if tmp.exists():  # left by a crashed save of ours
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_fn(tmp)
        return commit(tmp, target, state, marker=marker)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_folder_atomically(target_dir: str | os.PathLike[str], write_fn: Callable[[Path], Any]) -> Path:
    """Write a folder that is not a checkpoint (a saved model, an evaluation's images) so that it appears only
    when complete: ``write_fn(tmp)`` fills a hidden sibling, which then replaces ``target_dir`` atomically."""
    return save_atomically(target_dir, write_fn, marker=False)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - alive, someone else's
        return True
    return True


_HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|del|old)-(?P<tag>\d+)$")


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the hidden ``.<name>.tmp-<pid>`` / ``.del-<pid>`` / ``.old-<pid>`` leftovers of processes that no
    longer run (a save or a rotation killed midway). Leftovers of live processes are kept. Returns the removed
    paths."""
    root = Path(folder)
    if not root.is_dir():
        return []
    removed = []
    for path in root.iterdir():
        match = _HIDDEN.match(path.name)
        if match is None or _pid_alive(int(match["tag"])):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def write_text_atomically(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` (its folder created) through a hidden sibling and a rename, so a failure never
    leaves a truncated file over an earlier one. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---- listing, rotation, resume ------------------------------------------------------------------


def list_checkpoints(checkpoints_dir: str | os.PathLike[str], *, complete_only: bool = True) -> list[Path]:
    """``checkpoint_<epoch>`` folders in ``checkpoints_dir``, oldest epoch first (hidden ones never)."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _epoch_of(p) is not None]
    if complete_only:
        found = [p for p in found if is_complete(p)]
    return sorted(found, key=_epoch_of)


def rotate(checkpoints_dir: str | os.PathLike[str], keep: int, *,
           protect: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
    """Keep the ``keep`` newest complete ``checkpoint_<epoch>`` folders (by epoch number); delete older ones.

    Only visible ``checkpoint_<epoch>`` folders are ever deleted, so the hidden temporary
    folders of saves in progress are never touched, and the newest complete checkpoint
    always stays (``keep >= 1``). An incomplete ``checkpoint_<epoch>`` is deleted only when
    it is older than every kept checkpoint. Folders in ``protect`` (e.g. the best one) are
    neither deleted nor counted. Each victim is renamed to a hidden name before it is
    deleted, so a crash mid-delete leaves no half-deleted checkpoint under a real name.
    Returns the deleted paths.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    protected = {Path(p).resolve() for p in protect}
    visible = [p for p in list_checkpoints(checkpoints_dir, complete_only=False) if p.resolve() not in protected]
    complete = [p for p in visible if is_complete(p)]
    if len(complete) <= keep:
        return []
    oldest_kept = _epoch_of(complete[-keep])
    victims = [p for p in visible if _epoch_of(p) < oldest_kept]
    for path in victims:
        doomed = path.parent / f".{path.name}.del-{os.getpid()}"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return victims


def find_latest(path: str | os.PathLike[str]) -> Path:
    """The checkpoint to resume from at ``path``.

    ``path`` may be a checkpoint folder itself, a ``checkpoints`` folder, or a run folder
    (``<logdir>/<run_name>``, whose ``checkpoints`` folder is searched): the newest
    *complete* ``checkpoint_<epoch>`` is returned. Raises :class:`NoCheckpointError`
    naming ``path`` when nothing resumable is there.
    """
    root = Path(path)
    if not root.exists():
        raise NoCheckpointError(f"cannot resume from {root}: it does not exist")
    if not root.is_dir():
        raise NoCheckpointError(f"cannot resume from {root}: it is a file, not a checkpoint or run folder")
    if is_complete(root):
        return root
    if _epoch_of(root) is not None:
        raise NoCheckpointError(
            f"cannot resume from {root}: the checkpoint is incomplete ({MARKER} is missing; its save was "
            f"interrupted). Pass its run folder {root.parent.parent} to resume from the newest complete one"
        )
    for folder in (root, root / CHECKPOINTS_SUBDIR):
        found = list_checkpoints(folder)
        if found:
            return found[-1]
    raise NoCheckpointError(
        f"cannot resume from {root}: no complete checkpoint_<epoch> folder in it or in "
        f"{root / CHECKPOINTS_SUBDIR} (a complete one contains {MARKER})"
    )


# ---- RNG state --------------------------------------------------------------------------------------


def save_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch (CPU and every CUDA device) RNG states.

    The result holds only ints, floats, strings, lists and tensors, so ``torch.save`` /
    ``torch.load(weights_only=True)`` round-trip it.
    """
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss},
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`save_rng_state` returned (CUDA states only where CUDA is available)."""
    import numpy as np
    import torch

    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    nps = state["numpy"]
    np.random.set_state({
        "bit_generator": nps["bit_generator"],
        "state": {"key": np.asarray(nps["key"], dtype=np.int64).astype(np.uint32), "pos": nps["pos"]},
        "has_gauss": nps["has_gauss"],
        "gauss": nps["gauss"],
    })
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        saved, present = list(state["cuda"]), torch.cuda.device_count()
        if len(saved) != present:
            warnings.warn(
                f"the checkpoint holds the RNG states of {len(saved)} CUDA devices and this machine has "
                f"{present}; restoring the first {min(len(saved), present)}, so sampling will not repeat exactly",
                stacklevel=2,
            )
        for device, device_state in enumerate(saved[:present]):
            torch.cuda.set_rng_state(torch.as_tensor(device_state, dtype=torch.uint8).cpu(), device)
