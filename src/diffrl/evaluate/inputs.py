"""What an evaluation is asked about: prompts (with their split) and rewards, built and checked before any model
loads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, NamedTuple

from diffrl import prompts
from diffrl import rewards
from diffrl.config.overrides import KeyValueError
from diffrl.config.overrides import parse_key_value as _parse_key_value

TRAIN = "train"
HELDOUT = "heldout"
SPLITS = (TRAIN, HELDOUT)
"""``train``: the prompts given with ``--prompts``/``--prompt-source``; ``heldout``: unseen prompts."""


class EvaluationError(ValueError):
    """A bad evaluation setting; the message names the setting, the value and the fix."""


class PromptItem(NamedTuple):
    """One prompt of an evaluation: its text, the metadata its source gave (rewards may read it), and its split."""

    text: str
    metadata: dict[str, Any]
    split: str


def parse_key_value(text: str, setting: str) -> tuple[str, Any]:
    """``key=value`` -> ``(key, value)``, read as in every other subcommand (:func:`diffrl.config.overrides.
    parse_key_value`: YAML 1.2 values, so ``no`` stays a string and ``010`` is ten); errors name ``setting``."""
    try:
        return _parse_key_value(text)
    except KeyValueError as error:
        raise EvaluationError(f"{setting} {error}") from None


def draw_prompts(source: str, num: int, options: Mapping[str, Any] | None = None, *,
                 setting: str = "--prompt-source", at_most: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """``num`` distinct prompts (with metadata) from the prompt source ``source``, in the order first drawn
    (``at_most``: as many as the source has, when it has fewer).

    Sources draw with replacement from their own seeded RNG, so the same options give the same prompts.
    """

    if num < 1:
        raise EvaluationError(f"--num={num} must be at least 1 (the number of distinct prompts to draw from {source})")
    fn = prompts.load(source, **dict(options or {}))
    drawn: dict[str, dict[str, Any]] = {}
    max_draws = max(1000, 100 * num)
    for _ in range(max_draws):
        if len(drawn) >= num:
            break
        text, metadata = fn()
        drawn.setdefault(text, dict(metadata))
    if len(drawn) < num and not at_most:
        raise EvaluationError(f"{setting} {source} gave only {len(drawn)} distinct prompts in {max_draws} draws but "
                              f"{num} were asked for; lower --num to {len(drawn)} or less")
    return list(drawn.items())


def collect_prompts(prompts: Sequence[str] | None, source: str | None, num: int,
                    options: Mapping[str, Any] | None = None, *,
                    heldout: Sequence[str] | None = None, heldout_source: str | None = None,
                    heldout_num: int | None = None, heldout_options: Mapping[str, Any] | None = None,
                    ) -> list[PromptItem]:
    """The evaluation's prompts: the ``train`` split (a list or a source), then the ``heldout`` split.

    With neither a list nor a source, the train split is the single empty prompt (unconditional models).
    A prompt in both splits is an error: held-out prompts must be unseen.
    """
    if prompts and source:
        raise EvaluationError("give either --prompts or --prompt-source, not both")
    if heldout and heldout_source:
        raise EvaluationError("give either --heldout-prompts or --heldout-prompt-source, not both")
    if source:
        train = draw_prompts(source, num, options)
    else:
        train = [(p, {}) for p in _distinct(prompts or [""], "--prompts")]
    items = [PromptItem(text, meta, TRAIN) for text, meta in train]
    if heldout_source:
        held = draw_prompts(heldout_source, heldout_num or num, heldout_options, setting="--heldout-prompt-source")
    else:
        held = [(p, {}) for p in _distinct(heldout or [], "--heldout-prompts")]
    train_texts = {item.text for item in items}
    overlap = [text for text, _ in held if text in train_texts]
    if overlap:
        raise EvaluationError(f"held-out prompts {overlap[:3]} are also among the train prompts; held-out prompts "
                              "must be unseen: remove them from one of the two lists")
    return items + [PromptItem(text, meta, HELDOUT) for text, meta in held]


def _distinct(prompts: Sequence[str], setting: str) -> list[str]:
    seen: list[str] = []
    for p in prompts:
        if p in seen:
            raise EvaluationError(f"{setting} lists {p!r} twice; give each prompt once "
                                  "(use more seeds for more samples)")
        seen.append(p)
    return seen


def reward_options(names: Sequence[str], items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Parse ``--reward-option name.key=value`` items into ``{reward name: {key: value}}``."""
    options: dict[str, dict[str, Any]] = {name: {} for name in names}
    for item in items:
        dotted, value = parse_key_value(item, "--reward-option")
        name, dot, key = dotted.partition(".")
        if not dot or not key:
            raise EvaluationError(f"--reward-option {item!r} must look like REWARD.KEY=VALUE, e.g. digit.digit=7")
        if name not in options:
            raise EvaluationError(f"--reward-option {item!r} is for reward {name!r}, which is not evaluated; "
                                  f"add --reward {name} (evaluated: {', '.join(names) or 'none'})")
        options[name][key] = value
    return options


def build_rewards(names: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None
                  ) -> dict[str, Callable]:
    """Build each named reward with its options (checked now; reward models load on first use)."""

    if not names:
        raise EvaluationError(f"no reward to score with; add --reward NAME (known: {', '.join(rewards.available())})")
    built: dict[str, Callable] = {}
    for name in names:
        if name in built:
            raise EvaluationError(f"--reward {name} is given twice; give each reward once")
        built[name] = rewards.load(name, **dict((options or {}).get(name, {})))
    return built
