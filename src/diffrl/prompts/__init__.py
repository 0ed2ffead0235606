"""Prompt sources: callables ``prompt_fn() -> (prompt, prompt_metadata)`` (TRL's ``prompt_function``).

The sets from the DDPO paper (Black et al. 2023; ddpo-pytorch's ``prompts.py``):
``simple_animals`` (45 common animals), ``imagenet_animals`` (the first 398 ImageNet-1k
classes, which are the animals), ``imagenet_all`` (all 1000), ``nouns_activities``
("a cat riding a bike", the prompt-alignment task) and ``counting`` ("three dogs", with
question/answer metadata); plus ``from_file``, ``jsonl`` (prompts with metadata), ``hf_dataset`` (a Hugging Face dataset), ``fixed``
lists and ``empty`` (for unconditional models). Class names are ImageNet-1k's first WordNet synonym.

The built-in sources are :class:`PromptSource` objects: draw ``i`` depends on the seed and ``i``
alone (``Stream.PROMPTS`` of :mod:`diffrl.seeding`, never the global RNG), so the same seed gives
the same prompt stream. A trainer gives each process its own share of the stream
(:meth:`PromptSource.shard`: process ``r`` of ``n`` takes draws ``r, r + n, r + 2n, ...``) and
saves its position in every checkpoint (:meth:`PromptSource.state_dict`), so a resumed run
scores the prompts an uninterrupted one would. ``diffrl train`` seeds a source with the run's
``seed`` unless ``prompt_options.seed`` is given. Build sources by name with :func:`load`,
like the rewards.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from diffrl.prompts.hub_datasets import hf_dataset
from diffrl.prompts.source import PromptError, PromptFn, PromptList, PromptRecords, PromptSource
from diffrl.registry import Registry, positional_parameters

__all__ = [
    "PromptError",
    "PromptFn",
    "PromptList",
    "PromptSource",
    "available",
    "counting",
    "empty",
    "fixed",
    "from_file",
    "imagenet_all",
    "imagenet_animals",
    "hf_dataset",
    "indefinite_article",
    "jsonl",
    "load",
    "nouns_activities",
    "plural",
    "read_prompt_data",
    "register",
    "simple_animals",
]

ACTIVITIES = ("washing dishes", "riding a bike", "playing chess")
"""The DDPO paper's activities for the prompt-alignment task."""

IMAGENET_ANIMALS = 398
"""ImageNet-1k classes 0-397 are animals (tench ... puffer); 398 on are objects and scenes."""

_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()

_IRREGULAR_PLURALS = {
    "mouse": "mice", "goose": "geese", "sheep": "sheep", "deer": "deer", "fish": "fish", "ox": "oxen",
    "wolf": "wolves", "person": "people", "child": "children", "moose": "moose", "bison": "bison",
}


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


class _NounsActivities(PromptSource):
    def __init__(self, nouns: list[str], activities: list[str], seed: int | None) -> None:
        super().__init__(seed)
        self.nouns, self.activities = nouns, activities

    def draw(self, index: int) -> tuple[str, dict[str, Any]]:
        rng = self.rng(index)
        noun, activity = rng.choice(self.nouns), rng.choice(self.activities)
        return f"{indefinite_article(noun)} {noun} {activity}", {"noun": noun, "activity": activity}


def nouns_activities(
    *, nouns: str | Sequence[str] = "simple_animals", activities: Sequence[str] = ACTIVITIES, seed: int | None = 0
) -> PromptFn:
    """Prompts "a(n) <noun> <activity>" with a random noun and activity (DDPO's prompt-alignment task)."""
    if isinstance(activities, str) or not activities or not all(isinstance(a, str) and a for a in activities):
        raise PromptError(f"prompt source 'nouns_activities': activities must be a non-empty list, got {activities!r}")
    return _NounsActivities(_nouns(nouns, "nouns_activities"), list(activities), seed)


class _Counting(PromptSource):
    def __init__(self, nouns: list[str], low: int, high: int, seed: int | None) -> None:
        super().__init__(seed)
        self.nouns, self.low, self.high = nouns, low, high

    def draw(self, index: int) -> tuple[str, dict[str, Any]]:
        rng = self.rng(index)
        noun, count = rng.choice(self.nouns), rng.randint(self.low, self.high)
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


def jsonl(*, path: str | Path, key: str = "prompt", order: str = "sample", seed: int | None = 0) -> PromptRecords:
    """Prompts from a JSON Lines file: one object per line, its ``key`` field the prompt and every other field
    its metadata (handed to the reward as ``prompt_metadata``: GenEval-style tags, OCR targets, ...)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise PromptError(f"prompt source 'jsonl': file {str(file)!r} does not exist; check option path")
    records = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptError(f"prompt source 'jsonl': {file}:{number} is not JSON ({err.msg}); write one object "
                              "per line") from err
        if not isinstance(item, dict) or not isinstance(item.get(key), str):
            raise PromptError(f"prompt source 'jsonl': {file}:{number} has no string field {key!r}; every line "
                              f"needs one (or set option key to the field that holds the prompt)")
        records.append((item[key], {k: v for k, v in item.items() if k != key}))
    if not records:
        raise PromptError(f"prompt source 'jsonl': file {str(file)!r} has no prompts (one JSON object per line)")
    return PromptRecords(records, order=order, seed=seed)


def fixed(*, prompts: Sequence[str], order: str = "cycle", seed: int | None = 0) -> PromptList:
    """Prompts from a given list, in turn (``order="cycle"``) or sampled (``order="sample"``)."""
    return PromptList(prompts, order=order, seed=seed, source="fixed")


def empty() -> PromptFn:
    """Always ``""`` (for unconditional models, which ignore prompts)."""
    return lambda: ("", {})


def is_prompt_function(target: Any) -> bool:
    """A reference that is already a prompt function (TRL's ``prompt_fn() -> (prompt, metadata)``): a callable
    without parameters; one with parameters, or a class, is a factory called with ``prompt_options``."""
    if isinstance(target, type):
        return False
    try:
        return not inspect.signature(target).parameters
    except (TypeError, ValueError):
        return positional_parameters(target) == 0


SOURCES: Registry[PromptFn] = Registry("prompt source", "known sources", PromptError, {
    source.__name__: source for source in (simple_animals, imagenet_animals, imagenet_all, nouns_activities, counting,
                                           from_file, jsonl, hf_dataset, fixed, empty)
}, entry_points="diffrl.prompts", direct=is_prompt_function)
"""The prompt-source names ``load`` knows; ``register`` adds one (a factory taking keyword options); installed
packages add theirs through the ``diffrl.prompts`` entry-point group, and ``load("pkg.mod:name")`` takes a
reference to your own prompt function or factory."""
_REGISTRY = SOURCES.factories

available = SOURCES.available
register = SOURCES.register
load = SOURCES.load
