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

import difflib
import inspect
import json
import random
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from diffrl.registry import Registry, positional_parameters
from diffrl.seeding import Stream, stream_seed

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


def hf_dataset(*, path: str | Path, column: str = "prompt", name: str | None = None, split: str = "train",
               metadata_columns: Sequence[str] | None = None, revision: str | None = None,
               data_files: str | Sequence[str] | None = None, order: str = "sample",
               seed: int | None = 0) -> PromptRecords:
    """Prompts from a Hugging Face dataset through ``datasets``: a Hub id (``name`` its config, ``revision``), a
    folder written by ``Dataset.save_to_disk``, or a builder with local files (``path="json"``,
    ``data_files=...``; offline from the local cache with ``HF_DATASETS_OFFLINE=1``). ``column`` holds the
    prompts; ``metadata_columns`` (default: none) become each prompt's metadata. The split is read once into
    memory, so draws shard and resume like every built-in source."""
    try:
        import datasets
    except ImportError as err:  # an optional extra
        raise PromptError("prompt source 'hf_dataset' needs the datasets package: pip install 'diffrl[datasets]'") \
            from err
    where = str(path)
    try:
        if Path(where).expanduser().is_dir() and (Path(where).expanduser() / "state.json").is_file():
            loaded = datasets.load_from_disk(str(Path(where).expanduser()))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise PromptError(f"prompt source 'hf_dataset': {where} has no split {split!r}; its splits: "
                                      f"{', '.join(loaded)}")
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(where, name, split=split, revision=revision, data_files=data_files)
    except PromptError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as err:
        raise PromptError(f"prompt source 'hf_dataset': cannot load {where!r} (name={name!r}, split={split!r}): "
                          f"{type(err).__name__}: {str(err).splitlines()[0][:300]}") from err
    columns = list(loaded.column_names)
    wanted = [column, *(metadata_columns or [])]
    for needed in wanted:
        if needed not in columns:
            close = difflib.get_close_matches(needed, columns, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PromptError(f"prompt source 'hf_dataset': {where} has no column {needed!r}{hint}; its columns: "
                              f"{', '.join(columns)}")
    texts = loaded[column]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise PromptError(f"prompt source 'hf_dataset': column {column!r} of {where} must hold strings (one prompt "
                          "per row) and must not be empty")
    extra = {c: loaded[c] for c in metadata_columns or []}
    records = [(text, {c: values[i] for c, values in extra.items()}) for i, text in enumerate(texts)]
    return PromptRecords(records, order=order, seed=seed, source="hf_dataset")


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
