"""What every built-in prompt source is: a stream whose ``i``-th draw is a pure function of its seed and ``i``."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from diffrl.seeding import Stream, stream_seed

__all__ = ["ORDERS", "PromptError", "PromptFn", "PromptList", "PromptRecords", "PromptSource"]

PromptFn = Callable[[], tuple[str, dict[str, Any]]]
"""A prompt source: each call returns ``(prompt, prompt_metadata)``."""

ORDERS = ("sample", "cycle")


class PromptError(ValueError):
    """A bad prompt-source configuration; the message names the source, the setting and the fix."""


class PromptSource:
    """A prompt source whose ``i``-th draw is a pure function of its seed and ``i`` (:meth:`draw`).

    Calling it returns the next draw of this process's share of the stream; :meth:`shard` sets the share,
    :meth:`state_dict` / :meth:`load_state_dict` save and restore the position (what a checkpoint keeps).
    """

    def __init__(self, seed: int | None = 0) -> None:
        self.seed = random.SystemRandom().randrange(2**62) if seed is None else int(seed)
        self._count, self._offset, self._stride = 0, 0, 1

    def draw(self, index: int) -> tuple[str, dict[str, Any]]:
        """The prompt and metadata at position ``index`` of the whole stream."""
        raise NotImplementedError

    def rng(self, index: int) -> random.Random:
        """The random draws of position ``index`` (independent of every other position)."""
        return random.Random(stream_seed(Stream.PROMPTS, self.seed, index))

    def __call__(self) -> tuple[str, dict[str, Any]]:
        index = self._offset + self._stride * self._count
        self._count += 1
        return self.draw(index)

    def shard(self, process_index: int, num_processes: int) -> "PromptSource":
        """Make this the share of process ``process_index`` of ``num_processes``: draws ``process_index``,
        ``process_index + num_processes``, ...; no two processes draw the same position."""
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index={process_index} is not in [0, num_processes={num_processes})")
        self._offset, self._stride = process_index, num_processes
        return self

    def state_dict(self) -> dict[str, int]:
        """The position in this process's share (the same count on every process of a run)."""
        return {"count": self._count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._count = int(state["count"])


class PromptList(PromptSource):
    """Prompts from a list, drawn uniformly at random (``order="sample"``) or in turn (``order="cycle"``)."""

    def __init__(
        self, prompts: Sequence[str], *, order: str = "sample", seed: int | None = 0, source: str = "fixed"
    ) -> None:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise PromptError(f"prompt source '{source}': prompts must be a list of strings, got {prompts!r}")
        if len(prompts) == 0:
            raise PromptError(f"prompt source '{source}': the prompt list is empty")
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise PromptError(f"prompt source '{source}': prompts must be strings, got {prompt!r}")
        if order not in ORDERS:
            raise PromptError(f"prompt source '{source}': order={order!r} must be one of {list(ORDERS)}")
        super().__init__(seed)
        self.prompts = list(prompts)
        self.order = order

    def draw(self, index: int) -> tuple[str, dict[str, Any]]:
        if self.order == "cycle":
            return self.prompts[index % len(self.prompts)], {}
        return self.rng(index).choice(self.prompts), {}


class PromptRecords(PromptList):
    """Prompts with per-prompt metadata (each record's other fields), drawn as :class:`PromptList` draws."""

    def __init__(self, records: Sequence[tuple[str, dict[str, Any]]], *, order: str = "sample", seed: int | None = 0,
                 source: str = "jsonl") -> None:
        super().__init__([prompt for prompt, _ in records], order=order, seed=seed, source=source)
        self.metadata = [dict(meta) for _, meta in records]

    def draw(self, index: int) -> tuple[str, dict[str, Any]]:
        if self.order == "cycle":
            i = index % len(self.prompts)
        else:
            i = self.rng(index).randrange(len(self.prompts))
        return self.prompts[i], dict(self.metadata[i])
