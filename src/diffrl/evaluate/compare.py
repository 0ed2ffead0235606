"""Compare models on the same prompts and the same noise: rewards, diversity, and preview images for the report.

Models are loaded one at a time (only one is in memory), sampled in batches, and each batch is scored by
every reward and reduced to features at once, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from diffrl._version import __version__
from diffrl.evaluate.features import ImageFeatures, PixelFeatures
from diffrl.evaluate.inputs import SPLITS, EvaluationError, PromptItem
from diffrl.metrics import MeanSE, diversity, mean_se, paired_difference
from diffrl.evaluate.sample import SampleBatch, SampleSettings, check_prompts_fit, generate, make_jobs, thumbnails
from diffrl.rewards import RewardError, score

BatchHook = Callable[[str, SampleBatch, dict[str, torch.Tensor]], None]
"""``hook(model_name, batch, rewards)``, called after each batch is scored (``rewards``: name -> ``[B]``)."""


@dataclass(frozen=True)
class ModelSource:
    """A model to evaluate: its name, a function returning its policy (called when its turn comes), and what it
    is (``source``, ``kind``, ``lora``, ``base_model``...) for the results."""

    name: str
    get: Callable[[], Any]
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, name: str, policy: Any, **info: Any) -> "ModelSource":
        """An already-loaded policy."""
        return cls(name, lambda: policy, dict(info))


@dataclass
class Evaluation:
    """Everything measured: ``P`` prompts, ``S`` seeds, models in order (the first is the baseline).

    Attributes:
        rewards: model -> reward name -> ``[P, S]`` reward of each image.
        diversity: model -> ``[P]`` mean pairwise feature distance between the ``S`` images of each prompt.
        previews: model -> ``[K, S', 3, h, w]`` uint8 thumbnails of the first prompts of each split
            (``preview_prompts`` indexes them) and the first seeds (``preview_seeds``).
    """

    models: list[str]
    model_info: dict[str, dict[str, Any]]
    prompts: list[PromptItem]
    seeds: list[int]
    settings: SampleSettings
    reward_names: list[str]
    rewards: dict[str, dict[str, torch.Tensor]]
    diversity: dict[str, torch.Tensor]
    previews: dict[str, torch.Tensor]
    preview_prompts: list[int]
    preview_seeds: list[int]
    features: str = "pixels"
    feature_metric: str = "rms"
    trained_reward: str | None = None
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def baseline(self) -> str:
        return self.models[0]

    @property
    def splits(self) -> list[str]:
        present = {p.split for p in self.prompts}
        return [s for s in SPLITS if s in present]

    def indices(self, split: str) -> list[int]:
        return [i for i, p in enumerate(self.prompts) if p.split == split]

    def metric_names(self) -> list[str]:
        return [f"reward/{name}" for name in self.reward_names] + ["diversity"]

    def _values(self, model: str, metric: str, rows: list[int]) -> torch.Tensor:
        if metric == "diversity":
            return self.diversity[model][rows]
        return self.rewards[model][metric.removeprefix("reward/")][rows]

    def summary(self) -> dict[str, dict[str, dict[str, MeanSE]]]:
        """model -> split -> metric -> mean ± SE (rewards over all images of the split, diversity over its prompts)."""
        return {m: {s: {k: mean_se(self._values(m, k, self.indices(s))) for k in self.metric_names()}
                    for s in self.splits} for m in self.models}

    def versus_baseline(self) -> dict[str, dict[str, dict[str, MeanSE]]]:
        """model -> split -> metric -> mean ± SE of (model - baseline), paired image by image (prompt by prompt
        for diversity): the samples share their noise, so the pairing removes the noise's own variation."""
        out: dict[str, dict[str, dict[str, MeanSE]]] = {}
        for m in self.models[1:]:
            out[m] = {s: {k: paired_difference(self._values(m, k, self.indices(s)),
                                               self._values(self.baseline, k, self.indices(s)))
                          for k in self.metric_names()} for s in self.splits}
        return out

    def per_prompt(self, model: str) -> list[dict[str, Any]]:
        """One row per prompt: each reward's mean ± SE over the seeds, and the diversity."""
        rows = []
        for i, prompt in enumerate(self.prompts):
            row: dict[str, Any] = {"prompt_index": i, "text": prompt.text, "split": prompt.split}
            for name in self.reward_names:
                row[f"reward/{name}"] = mean_se(self.rewards[model][name][i])
            row["diversity"] = float(self.diversity[model][i])
            rows.append(row)
        return rows

    def to_dict(self, files: Mapping[str, Sequence[str | None]] | None = None) -> dict[str, Any]:
        """``results.json``: settings, models, rewards, prompts, the summary, the paired differences, per-prompt rows
        and every image's rewards (with its file when ``files[model]`` lists them in (prompt, seed) order)."""

        def stats(table: Mapping[str, Mapping[str, Mapping[str, MeanSE]]]) -> dict:
            return {m: {s: {k: v.to_dict() for k, v in by_metric.items()} for s, by_metric in by_split.items()}
                    for m, by_split in table.items()}

        def per_prompt(model: str) -> list[dict[str, Any]]:
            return [{k: (v.to_dict() if isinstance(v, MeanSE) else (None if isinstance(v, float) and math.isnan(v)
                                                                      else v)) for k, v in row.items()}
                    for row in self.per_prompt(model)]

        samples = {}
        for m in self.models:
            listed = list((files or {}).get(m, []))
            samples[m] = [{"prompt_index": i, "seed": seed, "file": listed[i * len(self.seeds) + k] if listed else None,
                           "rewards": {n: float(self.rewards[m][n][i, k]) for n in self.reward_names}}
                          for i in range(len(self.prompts)) for k, seed in enumerate(self.seeds)]
        return {
            "diffrl_version": __version__,
            "settings": {**self.settings.to_dict(), "seeds": self.seeds, "features": self.features,
                         "feature_metric": self.feature_metric},
            "baseline": self.baseline,
            "models": [{"name": m, **self.model_info.get(m, {})} for m in self.models],
            "rewards": [{"name": n, "options": self.reward_options.get(n, {}), "trained": n == self.trained_reward}
                        for n in self.reward_names],
            "prompts": [{"index": i, "text": p.text, "split": p.split, "metadata": p.metadata}
                        for i, p in enumerate(self.prompts)],
            "summary": stats(self.summary()),
            "versus_baseline": stats(self.versus_baseline()),
            "per_prompt": {m: per_prompt(m) for m in self.models},
            "samples": samples,
        }


def _preview_rows(prompts: Sequence[PromptItem], per_split: int) -> list[int]:
    rows: list[int] = []
    for split in SPLITS:
        rows += [i for i, p in enumerate(prompts) if p.split == split][:per_split]
    return rows


def evaluate_models(models: Sequence[ModelSource], rewards: Mapping[str, Callable], prompts: Sequence[PromptItem],
                    seeds: Sequence[int], settings: SampleSettings, *, features: ImageFeatures | None = None,
                    trained_reward: str | None = None, reward_options: Mapping[str, Mapping[str, Any]] | None = None,
                    preview_prompts: int = 4, preview_seeds: int = 6, thumbnail: int = 256,
                    on_batch: BatchHook | None = None, log: Callable[[str], None] | None = None) -> Evaluation:
    """Sample every model on every (prompt, seed), score each image with every reward, measure diversity.

    The first model is the baseline the others are compared with. All models must share the shape of the
    initial noise (so they start from the same ``x_T``) and the image size.
    """
    if not models:
        raise EvaluationError("no model to evaluate; give --base (and --model for each fine-tuned result)")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise EvaluationError(f"model names {names} repeat; give each model its own name (--name)")
    if trained_reward is not None and trained_reward not in rewards:
        raise EvaluationError(f"--trained-reward {trained_reward} is not among the evaluated rewards "
                              f"{list(rewards)}; add --reward {trained_reward}")
    features = features or PixelFeatures()
    seeds = [int(s) for s in seeds]
    jobs = make_jobs(prompts, seeds)
    seed_pos = {s: k for k, s in enumerate(seeds)}
    shown_rows = _preview_rows(prompts, preview_prompts)
    row_of = {p: r for r, p in enumerate(shown_rows)}
    shown_seeds = seeds[:preview_seeds]
    P, S = len(prompts), len(seeds)
    result = Evaluation(names, {m.name: dict(m.info) for m in models}, list(prompts), seeds, settings,
                        list(rewards), {}, {}, {}, shown_rows, shown_seeds, features.name, features.metric,
                        trained_reward, {k: dict(v) for k, v in (reward_options or {}).items()})
    reference: tuple[str, tuple[int, ...], tuple[int, ...]] | None = None
    for model in models:
        policy = model.get()
        result.model_info[model.name] = dict(model.info)  # a loader may fill in what it loaded
        check_prompts_fit(policy, prompts, model.name)
        scores = {n: torch.full((P, S), math.nan) for n in rewards}
        spread = torch.full((P,), math.nan)
        pending: dict[int, dict[int, torch.Tensor]] = {}
        preview: torch.Tensor | None = None
        done = 0
        for batch in generate(policy, jobs, settings, progress=f"sampling {model.name}"):
            shape = tuple(batch.images.shape[1:])
            if reference is None:
                reference = (model.name, batch.noise_shape, shape)
            elif (batch.noise_shape, shape) != reference[1:]:
                raise EvaluationError(
                    f"model '{model.name}' starts from noise of shape {batch.noise_shape} and makes images of shape "
                    f"{shape}, but '{reference[0]}' uses {reference[1]} and {reference[2]}; models compared from the "
                    "same noise must share the latent shape and image size (same base architecture and resolution)")
            texts = [j.prompt.text for j in batch.jobs]
            metadata = [j.prompt.metadata for j in batch.jobs]
            batch_scores = {}
            for name, fn in rewards.items():
                try:
                    batch_scores[name], _ = score(fn, batch.images, texts, metadata)
                except RewardError as err:
                    raise EvaluationError(f"model '{model.name}', reward '{name}': {err}") from err
            feats = features(batch.images)
            thumbs = thumbnails(batch.images, thumbnail)
            for row, job in enumerate(batch.jobs):
                k = seed_pos[job.seed]
                for name in rewards:
                    scores[name][job.prompt_index, k] = batch_scores[name][row]
                group = pending.setdefault(job.prompt_index, {})
                group[k] = feats[row]
                if len(group) == S:
                    spread[job.prompt_index] = diversity(torch.stack([group[i] for i in range(S)]), features.metric)
                    del pending[job.prompt_index]
                if job.prompt_index in row_of and job.seed in shown_seeds:
                    if preview is None:
                        preview = torch.zeros(len(shown_rows), len(shown_seeds), *thumbs.shape[1:], dtype=torch.uint8)
                    preview[row_of[job.prompt_index], shown_seeds.index(job.seed)] = thumbs[row]
            if on_batch is not None:
                on_batch(model.name, batch, batch_scores)
            done += len(batch.jobs)
            if log is not None:
                log(f"{model.name}: {done}/{len(jobs)} images")
        result.rewards[model.name] = scores
        result.diversity[model.name] = spread
        result.previews[model.name] = preview if preview is not None else torch.zeros(0, 0, 3, 1, 1, dtype=torch.uint8)
        del policy
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result
