"""One self-contained HTML report per evaluation or training run: opens in any browser, no server, no JavaScript.

Images are embedded as base64 PNG data URIs and the style sheet is inline. Sections: side-by-side grids of
the baseline and fine-tuned samples from the same noise, the metric tables (mean ± standard error, the
paired difference to the baseline), per-prompt tables, training curves from a run's ``metrics.jsonl``
(drawn with Pillow by :func:`diffrl.evaluate.plots.line_plot`), and the configuration.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffrl._version import __version__
from diffrl.checkpoint import write_text_atomically
from diffrl.evaluate.compare import Evaluation
from diffrl.evaluate.inputs import HELDOUT
from diffrl.metrics import MeanSE
from diffrl.evaluate.plots import line_plot
from diffrl.run_folder import read_metrics

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px; color: #1b1f24; background: #fff; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 19px; margin-top: 32px; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 15px; margin: 18px 0 6px; } .meta { color: #57606a; font-size: 13px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: right; vertical-align: middle; }
th { background: #f6f8fa; } td.name, th.name { text-align: left; }
table.grid td, table.grid th { text-align: center; padding: 3px; } table.grid img { display: block; margin: 0 auto; }
.scroll { max-width: 100%; overflow-x: auto; }
.cap { font-size: 11px; color: #57606a; } .up { color: #1a7f37; } .down { color: #cf222e; }
.badge { font-size: 11px; padding: 1px 6px; border-radius: 8px; background: #ddf4ff; color: #0969da; }
.badge.heldout { background: #fff8c5; color: #9a6700; }
.figures { display: flex; flex-wrap: wrap; gap: 12px; } .figures img { border: 1px solid #d0d7de; }
pre { background: #f6f8fa; padding: 10px; font-size: 12px; overflow-x: auto; border: 1px solid #d0d7de; }
details summary { cursor: pointer; margin: 8px 0; }
"""

MAX_CURVES = 12
"""Training curves per run: ``reward/mean`` first, then other logged metrics in their logged order."""


@dataclass(frozen=True)
class Section:
    """A titled block of the report; ``body`` is HTML, already escaped."""

    title: str
    body: str


def png_data_uri(image: np.ndarray | bytes) -> str:
    """``data:image/png;base64,...`` for an ``H x W x 3`` uint8 array or for PNG bytes."""
    if isinstance(image, np.ndarray):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        image = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(image).decode("ascii")


def img_tag(image: np.ndarray | bytes, alt: str, width: int | None = None, height: int | None = None,
            pixelated: bool = False) -> str:
    size = (f' width="{width}"' if width else "") + (f' height="{height}"' if height else "")
    style = ' style="image-rendering: pixelated"' if pixelated else ""
    return f'<img src="{png_data_uri(image)}" alt="{html.escape(alt)}"{size}{style}>'


def table_html(header: Sequence[str], rows: Sequence[Sequence[str]], *, name_columns: int = 1) -> str:
    """A table; ``header`` is text (escaped), ``rows`` are HTML cells; the first ``name_columns`` align left."""
    head = "".join(f'<th class="name">{html.escape(h)}</th>' if i < name_columns else f"<th>{html.escape(h)}</th>"
                   for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="name">{c}</td>' if i < name_columns else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _badge(split: str) -> str:
    return f'<span class="badge {split}">{html.escape(split)}</span>'


def _delta(value: MeanSE) -> str:
    if math.isnan(value.mean):
        return "n/a"
    cls = "up" if value.mean > 0 else "down" if value.mean < 0 else ""
    sign = "+" if value.mean > 0 else ""
    err = "" if math.isnan(value.se) else f" ± {value.se:.2g}"
    return f'<span class="{cls}">{sign}{value.mean:.4g}{err}</span>'


def _metric_label(evaluation: Evaluation, metric: str) -> str:
    name = metric.removeprefix("reward/")
    if metric == "diversity":
        return f"diversity ({evaluation.features}, {evaluation.feature_metric} distance)"
    if evaluation.trained_reward is None:
        return metric
    role = "trained" if name == evaluation.trained_reward else "held-out"
    return f"{metric} ({role})"


def grid_section(evaluation: Evaluation) -> Section:
    """For each previewed prompt: one row per model, one column per seed, every column from the same noise."""
    caption_reward = evaluation.trained_reward or (evaluation.reward_names[0] if evaluation.reward_names else None)
    blocks = []
    # Thumbnails shrink with the number of seeds so a row fits a page (about 1000 px), never below 48 px; a
    # grid wider than the page scrolls inside its own box.
    thumb = max(48, min(96, 1000 // max(1, len(evaluation.preview_seeds)) - 8))
    for row, p in enumerate(evaluation.preview_prompts):
        prompt = evaluation.prompts[p]
        head = "<tr><th></th>" + "".join(f"<th>seed {s}</th>" for s in evaluation.preview_seeds) + "</tr>"
        lines = []
        for model in evaluation.models:
            thumbs = evaluation.previews[model][row]
            cells = []
            for col, seed in enumerate(evaluation.preview_seeds):
                array = thumbs[col].permute(1, 2, 0).numpy()
                h, w = array.shape[:2]
                scale = thumb / max(h, w)
                tag = img_tag(array, f"{model}, prompt {p}, seed {seed}", round(w * scale), round(h * scale),
                              pixelated=scale > 1)
                cap = ""
                if caption_reward is not None:
                    k = evaluation.seeds.index(seed)
                    cap = f'<div class="cap">{float(evaluation.rewards[model][caption_reward][p, k]):.4g}</div>'
                cells.append(f"<td>{tag}{cap}</td>")
            lines.append(f'<tr><th class="name">{html.escape(model)}</th>{"".join(cells)}</tr>')
        text = html.escape(prompt.text) if prompt.text else "<i>(no prompt: unconditional)</i>"
        blocks.append(f'<h3>{text} {_badge(prompt.split)}</h3><div class="scroll"><table class="grid">{head}'
                      f'{"".join(lines)}</table></div>')
    intro = ('<p class="meta">Rows: models; columns: seeds. Each column starts from the same initial noise and '
             'receives the same per-step noise in every model.'
             + (f' Under each image: its {html.escape(caption_reward)} reward.' if caption_reward else "") + "</p>")
    return Section("Samples from the same noise", intro + "".join(blocks))


def metrics_section(evaluation: Evaluation) -> Section:
    """Per split: each metric's mean ± SE per model, and each model's paired difference to the baseline."""
    summary, delta = evaluation.summary(), evaluation.versus_baseline()
    header = ["metric"]
    for m in evaluation.models:
        header.append(m)
        if m != evaluation.baseline:
            header.append(f"{m} − {evaluation.baseline}")
    parts = []
    for split in evaluation.splits:
        n_prompts = len(evaluation.indices(split))
        rows = []
        for metric in evaluation.metric_names():
            row = [html.escape(_metric_label(evaluation, metric))]
            for m in evaluation.models:
                row.append(html.escape(summary[m][split][metric].format()))
                if m != evaluation.baseline:
                    row.append(_delta(delta[m][split][metric]))
            rows.append(row)
        n_seeds = len(evaluation.seeds)
        counts = f"{n_prompts} prompt{'s' * (n_prompts != 1)} × {n_seeds} seed{'s' * (n_seeds != 1)}"
        parts.append(f"<h3>{_badge(split)} {counts}</h3>"
                     + table_html(header, rows))
    note = ('<p class="meta">mean ± standard error. Rewards: over all images of the split; diversity: mean pairwise '
            "distance between the images of one prompt, averaged over prompts (0 = every seed gives the same image). "
            "Differences to the baseline are paired (same prompt and noise). A trained reward that rises while "
            "held-out rewards, held-out prompts or diversity fall is the signature of reward hacking.</p>")
    return Section("Metrics", note + "".join(parts))


def per_prompt_section(evaluation: Evaluation) -> Section:
    """Collapsible tables, one per metric: prompts down, models across."""
    rows_by_model = {m: evaluation.per_prompt(m) for m in evaluation.models}
    parts = []
    for metric in evaluation.metric_names():
        rows = []
        for i, prompt in enumerate(evaluation.prompts):
            cells = [html.escape(prompt.text or "(no prompt)"), _badge(prompt.split)]
            for m in evaluation.models:
                value = rows_by_model[m][i][metric]
                cells.append(html.escape(value.format() if isinstance(value, MeanSE) else
                                         ("n/a" if math.isnan(value) else f"{value:.4g}")))
            rows.append(cells)
        table = table_html(["prompt", "split", *evaluation.models], rows, name_columns=2)
        parts.append(f"<details><summary>{html.escape(_metric_label(evaluation, metric))}</summary>{table}</details>")
    return Section("Per prompt", "".join(parts))


_CURVE_ORDER = ("reward/mean", "eval/", "reward/", "loss/", "stats/")


def _curve_rank(key: str) -> int:
    """reward/mean first, then evaluation, other reward statistics, losses, stats; timings and the rest last."""
    return next((i for i, prefix in enumerate(_CURVE_ORDER) if key.startswith(prefix)), len(_CURVE_ORDER))


def _curve_pngs(metrics_file: Path) -> list[tuple[str, bytes]]:
    rows = read_metrics(metrics_file)
    x_key = "epoch" if any("epoch" in r for r in rows) else "step"
    keys: list[str] = []
    for r in rows:
        keys += [k for k, v in r.items() if k not in keys and k not in ("epoch", "step", "reward/std")
                 and isinstance(v, (int, float)) and not isinstance(v, bool)]
    keys.sort(key=_curve_rank)
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, key in enumerate(keys[:MAX_CURVES]):
            points = [r for r in rows if isinstance(r.get(key), (int, float)) and x_key in r]
            if not points:
                continue
            bands = [float(r.get("reward/std", 0.0)) for r in points] if key == "reward/mean" else None
            title = f"{key} (band: ± reward/std)" if bands else key
            path = line_plot([r[x_key] for r in points], [float(r[key]) for r in points], Path(tmp, f"{i}.png"),
                             title=title, xlabel=x_key, bands=bands)
            figures.append((key, path.read_bytes()))
    return figures


def curves_section(runs: Mapping[str, Path]) -> Section:
    """Training curves of each run folder, from its ``metrics.jsonl``."""
    parts = []
    for label, run in runs.items():
        figures = _curve_pngs(Path(run) / "metrics.jsonl")
        if not figures:
            parts.append(f"<h3>{html.escape(label)}</h3>"
                         f"<p class='meta'>no metrics logged in {html.escape(str(run))}</p>")
            continue
        images = "".join(img_tag(png, key) for key, png in figures)
        parts.append(f'<h3>{html.escape(label)}</h3><p class="meta">{html.escape(str(run))}/metrics.jsonl</p>'
                     f'<div class="figures">{images}</div>')
    return Section("Training curves", "".join(parts))


def final_metrics_section(runs: Mapping[str, Path]) -> Section:
    """The last logged value of every metric of each run."""
    parts = []
    for label, run in runs.items():
        rows = read_metrics(Path(run) / "metrics.jsonl")
        last: dict[str, Any] = {}
        for r in rows:
            last.update(r)
        table = table_html(["metric", "last value"], [[html.escape(k), html.escape(f"{v:.6g}" if isinstance(v, float)
                                                                                    else str(v))]
                                                      for k, v in last.items()])
        parts.append(f"<h3>{html.escape(label)}</h3>{table}")
    return Section("Final training metrics", "".join(parts))


def config_section(configs: Mapping[str, str]) -> Section:
    return Section("Configuration", "".join(f"<h3>{html.escape(k)}</h3><pre>{html.escape(v)}</pre>"
                                            for k, v in configs.items()))


def render_html(title: str, sections: Sequence[Section], subtitle: str = "") -> str:
    """The whole page: inline CSS, then each section."""

    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    meta = html.escape(f"{subtitle + ' · ' if subtitle else ''}diffrl {__version__} · {stamp}")
    body = "".join(f"<section><h2>{html.escape(s.title)}</h2>{s.body}</section>" for s in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><p class=\"meta\">{meta}</p>"
            f"{body}</body></html>\n")


def _as_runs(runs: str | os.PathLike | Mapping[str, str | os.PathLike] | None) -> dict[str, Path]:
    if runs is None:
        return {}
    if isinstance(runs, Mapping):
        return {str(k): Path(v) for k, v in runs.items()}
    return {Path(runs).name or str(runs): Path(runs)}


def build_report(*, evaluation: Evaluation | None = None,
                 runs: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
                 title: str | None = None, config: str | Mapping[str, Any] | None = None) -> str:
    """The report's HTML for an evaluation and/or training run folders (label -> folder, or one folder)."""
    run_dirs = _as_runs(runs)
    for label, run in run_dirs.items():
        if not (run / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"run folder '{run}' ({label}) has no metrics.jsonl; give the folder a training "
                                    "run wrote (it holds config.yaml, metrics.jsonl and final/)")
    if evaluation is None and not run_dirs:
        raise ValueError("nothing to report: give an evaluation, a training run folder, or both")
    sections: list[Section] = []
    if evaluation is not None:
        sections += [metrics_section(evaluation), grid_section(evaluation), per_prompt_section(evaluation)]
    if run_dirs:
        sections += [curves_section(run_dirs), final_metrics_section(run_dirs)]
    configs: dict[str, str] = {}
    if config is not None:
        configs["evaluation"] = config if isinstance(config, str) else json.dumps(config, indent=2, default=str)
    for label, run in run_dirs.items():
        if (run / "config.yaml").is_file():
            configs[f"{label}: config.yaml"] = (run / "config.yaml").read_text(encoding="utf-8")
    if configs:
        sections.append(config_section(configs))
    subtitle = ""
    if evaluation is not None:
        heldout = len(evaluation.indices(HELDOUT))
        subtitle = (f"{len(evaluation.models)} models · {len(evaluation.prompts) - heldout} prompts"
                    f"{f' + {heldout} held-out' if heldout else ''} · {len(evaluation.seeds)} seeds · "
                    f"{evaluation.settings.num_inference_steps} steps")
    default = "Evaluation report" if evaluation is not None else f"Training run {', '.join(run_dirs)}"
    return render_html(title or default, sections, subtitle)


def write_report(path: str | os.PathLike, *, evaluation: Evaluation | None = None,
                 runs: str | os.PathLike | Mapping[str, str | os.PathLike] | None = None,
                 title: str | None = None, config: str | Mapping[str, Any] | None = None) -> Path:
    """Write :func:`build_report`'s page to ``path`` (its folder is created, the file replaced atomically);
    returns the path."""

    return write_text_atomically(path, build_report(evaluation=evaluation, runs=runs, title=title, config=config))


def text_summary(evaluation: Evaluation) -> str:
    """The metric table as text: per split, one line per metric, one column per model (and its difference)."""
    summary, delta = evaluation.summary(), evaluation.versus_baseline()
    lines = []
    for split in evaluation.splits:
        lines.append(f"[{split}] {len(evaluation.indices(split))} prompts x {len(evaluation.seeds)} seeds")
        header = ["metric"] + [c for m in evaluation.models
                               for c in ([m] if m == evaluation.baseline else [m, f"{m} - {evaluation.baseline}"])]
        rows = [header]
        for metric in evaluation.metric_names():
            row = [metric]
            for m in evaluation.models:
                row.append(summary[m][split][metric].format())
                if m != evaluation.baseline:
                    d = delta[m][split][metric]
                    row.append(("+" if d.mean > 0 else "") + d.format())
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)
