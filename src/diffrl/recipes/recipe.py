"""The interface of a training method (:class:`Recipe`) and the defaults most methods keep (:class:`RecipeBase`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from diffrl.config import SharedConfig
from diffrl.pipelines.types import DiffusionPolicy
from diffrl.recipes.epoch import EpochResult
from diffrl.recipes.run import Run
from diffrl.recipes.update import UpdateLoop


class Recipe(Protocol):
    """One training method, which a :class:`~diffrl.recipes.trainer.Trainer` composes with a :class:`Run`.

    ``__init__(config, policy, reward_fn, prompt_fn)`` only checks its inputs (no work, no side effects);
    :meth:`setup` snapshots what it needs of the initial weights and builds :attr:`update` (which prepares the
    model); :meth:`run_epoch` is the method, top to bottom (sample -> score -> advantages -> update).
    :meth:`state_dict` is the recipe's JSON state saved in every checkpoint; :meth:`save_files` /
    :meth:`load_files` any tensors it keeps beside the weights (written inside the checkpoint's atomic commit;
    every process calls it).
    """

    update: UpdateLoop

    def setup(self, run: Run) -> None: ...

    def run_epoch(self, epoch: int, global_step: int) -> EpochResult: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save_files(self, folder: Path) -> None: ...

    def load_files(self, folder: Path) -> None: ...


class RecipeBase:
    """What a recipe is given, and the :class:`Recipe` methods most recipes leave as they are (no state of
    their own, no extra files)."""

    run: Run
    update: UpdateLoop

    def __init__(self, config: SharedConfig, policy: DiffusionPolicy, reward_fn: Callable,
                 prompt_fn: Callable) -> None:
        self.config, self.policy, self.reward_fn, self.prompt_fn = config, policy, reward_fn, prompt_fn

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def save_files(self, folder: Path) -> None:
        return None

    def load_files(self, folder: Path) -> None:
        return None
