"""Pictures a run leaves behind: image grids and a reward curve, drawn with Pillow (no plotting dependency)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffrl.run_folder import read_metrics


def image_grid(rows: Sequence[torch.Tensor], path: Path, *, cell: int = 48, labels: Sequence[str] = ()) -> Path:
    """Save rows of images (each ``[n, 3, H, W]`` in ``[0, 1]``) as one PNG, upscaled to ``cell`` pixels, with
    an optional label left of each row."""
    label_w = 70 if labels else 0
    n = max(r.shape[0] for r in rows)
    canvas = Image.new("RGB", (label_w + n * (cell + 2), len(rows) * (cell + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, row in enumerate(rows):
        if i < len(labels):
            draw.text((4, i * (cell + 2) + cell // 2 - 5), labels[i], fill="black")
        arrays = (row.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        for j, array in enumerate(arrays):
            tile = Image.fromarray(array).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (cell + 2), i * (cell + 2)))
    canvas.save(path)
    return path


def value_range(lo: float, hi: float) -> tuple[float, float]:
    """The y-axis of a curve: ``[lo, hi]``, widened to at least 1e-3 of the values' magnitude (and 1e-5), so a
    curve that is constant up to float rounding draws flat instead of magnifying the rounding to full height. (The
    absolute floor: a log-probability near 0 moves in float32 steps of about 6e-8; at 1e-6 a curve of such steps
    still zigzagged over a quarter of the plot, seen in the quickstart's ``reward/max``.)"""
    span = max(1e-3 * max(abs(lo), abs(hi)), 1e-5)
    if hi - lo < span:
        middle = (hi + lo) / 2
        lo, hi = middle - span / 2, middle + span / 2
    return lo, hi


def _axes(size: tuple[int, int], margins: tuple[int, int, int, int], title: str, x_range: tuple[float, float],
          y_range: tuple[float, float]):
    """A white canvas with the title, the plot frame and three y-axis labels: ``(image, draw, px)`` where
    ``px(x, y)`` maps data to pixels."""
    w, h = size
    left, right, top, bottom = margins
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill="black")
    (x0, x1), (lo, hi) = x_range, y_range

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right), top + (hi - y) / (hi - lo) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for frac in (0.0, 0.5, 1.0):
        y = lo + frac * (hi - lo)
        d.text((4, px(x0, y)[1] - 5), f"{y:.3g}", fill="black")
    return img, d, px


def _blank(size: tuple[int, int], left: int, title: str, path: Path) -> Path:
    """A chart with no points: the title on a white canvas."""
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((left, 8), title, fill="black")
    img.save(path)
    return path


def _x_range(xs: Sequence[float]) -> tuple[float, float]:
    x0, x1 = min(xs), max(xs)
    return x0, (x1 if x1 > x0 else x0 + 1)


def line_plot(xs: Sequence[float], ys: Sequence[float], path: Path, *, title: str, xlabel: str = "epoch",
              bands: Sequence[float] | None = None, size: tuple[int, int] = (480, 300)) -> Path:
    """A minimal line chart (with an optional +-band, e.g. the reward std) saved as PNG."""
    w, h = size
    left, right, top, bottom = margins = 60, 15, 28, 35
    if len(xs) == 0:
        return _blank(size, left, title, path)
    lo = min(y - (bands[i] if bands else 0) for i, y in enumerate(ys))
    hi = max(y + (bands[i] if bands else 0) for i, y in enumerate(ys))
    x0, x1 = _x_range(xs)
    img, d, px = _axes(size, margins, title, (x0, x1), value_range(lo, hi))
    d.text((left, h - bottom + 5), f"{x0:g}", fill="black")
    d.text((w - right - 30, h - bottom + 5), f"{x1:g}", fill="black")
    d.text(((w - left) // 2, h - 15), xlabel, fill="black")
    if bands:
        upper = [px(x, y + b) for x, y, b in zip(xs, ys, bands)]
        lower = [px(x, y - b) for x, y, b in zip(xs, ys, bands)]
        d.polygon(upper + lower[::-1], fill=(200, 220, 255))
    points = [px(x, y) for x, y in zip(xs, ys)]
    if len(points) > 1:
        d.line(points, fill=(20, 60, 200), width=2)
    for p in points:
        d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=(20, 60, 200))
    img.save(path)
    return path


def reward_curve(metrics_file: Path, path: Path) -> Path:
    """``reward/mean`` (+- ``reward/std``) per epoch from a run's ``metrics.jsonl``."""
    rows = [m for m in read_metrics(metrics_file) if "reward/mean" in m]
    return line_plot([m["epoch"] for m in rows], [m["reward/mean"] for m in rows], path,
                     title="reward/mean per epoch (band: +-std)", bands=[m.get("reward/std", 0.0) for m in rows])


PALETTE = ((20, 60, 200), (200, 40, 40), (30, 150, 60), (230, 130, 0), (130, 50, 170), (0, 150, 160),
           (120, 120, 120), (180, 150, 0))


def curves_plot(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], path: Path, *, title: str,
                xlabel: str, ylabel: str, size: tuple[int, int] = (640, 420)) -> Path:
    """Several labelled curves ``(label, xs, ys)`` on shared axes, with a legend, saved as PNG. The first curve is
    drawn black and thick (a reference, e.g. an optimum frontier); the others in :data:`PALETTE` colours, points
    marked, in the order given."""
    w, h = size
    left, right, top, bottom = margins = 60, 170, 28, 40
    xs_all = [x for _, xs, _ in series for x in xs]
    ys_all = [y for _, _, ys in series for y in ys]
    if not xs_all:
        return _blank(size, left, title, path)
    x0, x1 = _x_range(xs_all)
    lo, hi = value_range(min(ys_all), max(ys_all))
    img, d, px = _axes(size, margins, title, (x0, x1), (lo, hi))
    for frac in (0.0, 0.5, 1.0):
        x = x0 + frac * (x1 - x0)
        d.text((px(x, lo)[0] - 8, h - bottom + 5), f"{x:.3g}", fill="black")
    d.text(((w - right + left) // 2 - 20, h - 15), xlabel, fill="black")
    d.text((4, 14), ylabel, fill="black")
    for i, (label, xs, ys) in enumerate(series):
        colour = (0, 0, 0) if i == 0 else PALETTE[(i - 1) % len(PALETTE)]
        points = [px(x, y) for x, y in zip(xs, ys)]
        if len(points) > 1:
            d.line(points, fill=colour, width=3 if i == 0 else 1)
        for p in points:
            d.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)
        ly = top + 14 * i
        d.line([(w - right + 8, ly + 6), (w - right + 24, ly + 6)], fill=colour, width=3)
        d.text((w - right + 28, ly), label[:24], fill="black")
    img.save(path)
    return path
