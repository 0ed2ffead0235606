"""Prompt sources: callables ``prompt_fn() -> (prompt, prompt_metadata)`` (TRL's ``prompt_function``).

The sets from the DDPO paper (Black et al. 2023; ddpo-pytorch's ``prompts.py``):
``simple_animals`` (45 common animals), ``imagenet_animals`` (the first 398 ImageNet-1k
classes, which are the animals), ``imagenet_all`` (all 1000), ``nouns_activities``
("a cat riding a bike", the prompt-alignment task) and ``counting`` ("three dogs", with
question/answer metadata); plus ``from_file``, ``fixed`` lists and ``empty`` (for
unconditional models). Class names are ImageNet-1k's first WordNet synonym.

Every source draws from its own ``random.Random(seed)`` (never the global RNG), so the
same seed gives the same prompt stream. Seeds default to 0; in multi-process training
give each process its own (e.g. ``seed + process_index``). Build sources by name with
:func:`load`, like the rewards.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from diffrl.registry import Registry

__all__ = [
    "PromptError",
    "PromptFn",
    "PromptList",
    "available",
    "counting",
    "empty",
    "fixed",
    "from_file",
    "imagenet_all",
    "imagenet_animals",
    "indefinite_article",
    "load",
    "nouns_activities",
    "plural",
    "read_prompt_data",
    "register",
    "simple_animals",
]

PromptFn = Callable[[], tuple[str, dict[str, Any]]]
"""A prompt source: each call returns ``(prompt, prompt_metadata)``."""

ACTIVITIES = ("washing dishes", "riding a bike", "playing chess")
"""The DDPO paper's activities for the prompt-alignment task."""

IMAGENET_ANIMALS = 398
"""ImageNet-1k classes 0-397 are animals (tench ... puffer); 398 on are objects and scenes."""

ORDERS = ("sample", "cycle")

_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()

_IRREGULAR_PLURALS = {
    "mouse": "mice", "goose": "geese", "sheep": "sheep", "deer": "deer", "fish": "fish", "ox": "oxen",
    "wolf": "wolves", "person": "people", "child": "children", "moose": "moose", "bison": "bison",
}


class PromptError(ValueError):
    """A bad prompt-source configuration; the message names the source, the setting and the fix."""


class PromptList:
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
        self.prompts = list(prompts)
        self.order = order
        self._rng = random.Random(seed)
        self._next = 0

    def __call__(self) -> tuple[str, dict[str, Any]]:
        if self.order == "cycle":
            prompt = self.prompts[self._next % len(self.prompts)]
            self._next += 1
        else:
            prompt = self._rng.choice(self.prompts)
        return prompt, {}


def read_prompt_data(name: str) -> list[str]:
    """The non-empty lines of ``diffrl/prompt_data/<name>.txt``, stripped."""
    text = resources.files("diffrl").joinpath("prompt_data", f"{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_lines(path: str | Path, source: str) -> list[str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise PromptError(f"prompt source '{source}': file {str(path)!r} does not exist; check option path")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise PromptError(f"prompt source '{source}': file {str(path)!r} has no prompts (one prompt per line)")
    return lines


def _nouns(nouns: str | Sequence[str], source: str) -> list[str]:
    """A built-in noun list by name (``simple_animals``, ``imagenet_animals``, ``imagenet_all``) or a list."""
    if isinstance(nouns, str):
        if nouns == "simple_animals":
            return read_prompt_data("simple_animals")
        if nouns == "imagenet_animals":
            return read_prompt_data("imagenet_classes")[:IMAGENET_ANIMALS]
        if nouns == "imagenet_all":
            return read_prompt_data("imagenet_classes")
        raise PromptError(
            f"prompt source '{source}': nouns={nouns!r} must be simple_animals, imagenet_animals, "
            "imagenet_all or a list"
        )
    if not nouns or not all(isinstance(n, str) and n for n in nouns):
        raise PromptError(f"prompt source '{source}': nouns must be a non-empty list of strings, got {nouns!r}")
    return list(nouns)


def indefinite_article(noun: str) -> str:
    """``"a"`` or ``"an"`` by the first letter, with the common exceptions (a unicorn, an hour)."""
    word = noun.lower()
    if word.startswith(("eu", "uni", "use", "uk", "one", "ewe")):
        return "a"
    if word.startswith(("hour", "honest", "honor", "heir")):
        return "an"
    return "an" if word[:1] in "aeiou" else "a"


def plural(noun: str) -> str:
    """English plural of a (last) word: mouse -> mice, fox -> foxes, butterfly -> butterflies, wolf -> wolves."""
    head, _, last = noun.rpartition(" ")
    lower = last.lower()
    if lower in _IRREGULAR_PLURALS:
        word = _IRREGULAR_PLURALS[lower]
    elif lower.endswith(("s", "x", "z", "ch", "sh")):
        word = last + "es"
    elif lower.endswith("y") and lower[-2:-1] not in tuple("aeiou"):
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def simple_animals(*, seed: int | None = 0) -> PromptList:
    """One of 45 common animals ("cat", "dog", ...), sampled uniformly (DDPO's aesthetic/compressibility prompts)."""
    return PromptList(read_prompt_data("simple_animals"), seed=seed, source="simple_animals")


def imagenet_animals(*, seed: int | None = 0) -> PromptList:
    """One of the first 398 ImageNet-1k class names (the animal classes), sampled uniformly."""
    return PromptList(read_prompt_data("imagenet_classes")[:IMAGENET_ANIMALS], seed=seed, source="imagenet_animals")


def imagenet_all(*, seed: int | None = 0) -> PromptList:
    """One of the 1000 ImageNet-1k class names, sampled uniformly."""
    return PromptList(read_prompt_data("imagenet_classes"), seed=seed, source="imagenet_all")


class _NounsActivities:
    def __init__(self, nouns: list[str], activities: list[str], seed: int | None) -> None:
        self.nouns, self.activities = nouns, activities
        self._rng = random.Random(seed)

    def __call__(self) -> tuple[str, dict[str, Any]]:
        noun, activity = self._rng.choice(self.nouns), self._rng.choice(self.activities)
        return f"{indefinite_article(noun)} {noun} {activity}", {"noun": noun, "activity": activity}


def nouns_activities(
    *, nouns: str | Sequence[str] = "simple_animals", activities: Sequence[str] = ACTIVITIES, seed: int | None = 0
) -> PromptFn:
    """Prompts "a(n) <noun> <activity>" with a random noun and activity (DDPO's prompt-alignment task)."""
    if isinstance(activities, str) or not activities or not all(isinstance(a, str) and a for a in activities):
        raise PromptError(f"prompt source 'nouns_activities': activities must be a non-empty list, got {activities!r}")
    return _NounsActivities(_nouns(nouns, "nouns_activities"), list(activities), seed)


class _Counting:
    def __init__(self, nouns: list[str], low: int, high: int, seed: int | None) -> None:
        self.nouns, self.low, self.high = nouns, low, high
        self._rng = random.Random(seed)

    def __call__(self) -> tuple[str, dict[str, Any]]:
        noun, count = self._rng.choice(self.nouns), self._rng.randint(self.low, self.high)
        word = _NUMBER_WORDS[count]
        name = noun if count == 1 else plural(noun)
        return f"{word} {name}", {
            "noun": noun,
            "count": count,
            "question": f"How many {plural(noun)} are there in this image?",
            "answer": word,
        }


def counting(
    *, nouns: str | Sequence[str] = "simple_animals", low: int = 1, high: int = 9, seed: int | None = 0
) -> PromptFn:
    """Prompts "<number> <nouns>" ("three dogs"), low..high inclusive.

    Metadata: ``noun``, ``count``, ``question`` ("How many dogs are there in this image?") and ``answer`` ("three").
    """
    top = len(_NUMBER_WORDS) - 1
    if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high <= top):
        raise PromptError(
            f"prompt source 'counting': need integers 1 <= low <= high <= {top}, got low={low!r} high={high!r}"
        )
    return _Counting(_nouns(nouns, "counting"), low, high, seed)


def from_file(*, path: str | Path, order: str = "sample", seed: int | None = 0) -> PromptList:
    """Prompts from a text file, one per line (blank lines skipped); a missing or empty file is an error."""
    return PromptList(_read_lines(path, "from_file"), order=order, seed=seed, source="from_file")


def fixed(*, prompts: Sequence[str], order: str = "cycle", seed: int | None = 0) -> PromptList:
    """Prompts from a given list, in turn (``order="cycle"``) or sampled (``order="sample"``)."""
    return PromptList(prompts, order=order, seed=seed, source="fixed")


def empty() -> PromptFn:
    """Always ``""`` (for unconditional models, which ignore prompts)."""
    return lambda: ("", {})


SOURCES: Registry[PromptFn] = Registry("prompt source", "known sources", PromptError, {
    source.__name__: source for source in (simple_animals, imagenet_animals, imagenet_all, nouns_activities, counting,
                                           from_file, fixed, empty)
})
"""The prompt-source names ``load`` knows; ``register`` adds one (a factory taking keyword options)."""
_REGISTRY = SOURCES.factories

available = SOURCES.available
register = SOURCES.register
load = SOURCES.load
