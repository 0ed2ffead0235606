"""Summary statistics of an evaluation: mean ± standard error, paired differences, and sample diversity.

Pure functions of tensors; no models, no files.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

DistanceMetric = Literal["rms", "cosine"]
"""``rms``: root-mean-square difference of the features (pixels in ``[0, 1]`` give distances in ``[0, 1]``,
comparable across resolutions); ``cosine``: ``1 - cos`` of the features (CLIP embeddings)."""


class MeanSE(NamedTuple):
    """The mean of ``n`` values and its standard error ``std / sqrt(n)`` (sample std, ``ddof = 1``).

    ``se`` is ``nan`` when ``n < 2`` and ``mean`` is ``nan`` when ``n == 0``: there is nothing to estimate.
    """

    mean: float
    se: float
    n: int

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-safe: ``nan`` becomes ``None``."""
        return {"mean": _finite_or_none(self.mean), "se": _finite_or_none(self.se), "n": self.n}

    def format(self, digits: int = 4) -> str:
        """``"0.1234 ± 0.0056"``; ``"n/a"`` without values; the mean alone when the error is undefined."""
        if math.isnan(self.mean):
            return "n/a"
        if math.isnan(self.se):
            return f"{self.mean:.{digits}g}"
        return f"{self.mean:.{digits}g} ± {self.se:.2g}"


def _finite_or_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def mean_se(values: torch.Tensor) -> MeanSE:
    """Mean ± standard error of the entries of ``values`` (any shape, flattened; ``nan`` entries are skipped)."""
    flat = values.detach().double().flatten()
    flat = flat[~torch.isnan(flat)]
    n = int(flat.numel())
    if n == 0:
        return MeanSE(math.nan, math.nan, 0)
    mean = float(flat.mean())
    se = float(flat.std(correction=1) / math.sqrt(n)) if n > 1 else math.nan
    return MeanSE(mean, se, n)


def paired_difference(values: torch.Tensor, reference: torch.Tensor) -> MeanSE:
    """Mean ± standard error of ``values - reference``, entry by entry.

    Samples drawn from the same noise are paired, so the error of the difference is that of the
    per-sample differences, usually much smaller than the two unpaired errors combined.
    """
    if values.shape != reference.shape:
        raise ValueError(f"paired values have shapes {tuple(values.shape)} and {tuple(reference.shape)}; "
                         "they must match one to one (same prompts and seeds)")
    return mean_se(values.double() - reference.double())


def pairwise_distances(features: torch.Tensor, metric: DistanceMetric = "rms") -> torch.Tensor:
    """``[n, n]`` distances between the rows of ``features`` (``[n, d]``), computed in float64.

    Each pair is differenced directly (not through ``|a|^2 + |b|^2 - 2ab``), so identical rows are exactly 0
    under ``rms``.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be [n, d], got shape {tuple(features.shape)}")
    x = features.detach().double()
    n = x.shape[0]
    out = torch.zeros(n, n, dtype=torch.float64)
    if metric == "cosine":
        unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        out = (1.0 - unit @ unit.T).clamp_min(0.0)
        out.fill_diagonal_(0.0)
        return out
    if metric != "rms":
        raise ValueError(f"unknown distance metric {metric!r}; use 'rms' or 'cosine'")
    for i in range(n):
        out[i, i + 1:] = (x[i + 1:] - x[i]).pow(2).mean(dim=1).sqrt()
    return out + out.T


def diversity(features: torch.Tensor, metric: DistanceMetric = "rms") -> float:
    """Mean pairwise distance between the ``n`` samples of one prompt (rows of ``features``, ``[n, d]``).

    0 when every sample is the same image (mode collapse); ``nan`` with fewer than 2 samples.
    """
    n = features.shape[0]
    if n < 2:
        return math.nan
    d = pairwise_distances(features, metric)
    i, j = torch.triu_indices(n, n, offset=1)
    return float(d[i, j].mean())


def image_statistics(images: torch.Tensor) -> dict[str, float]:
    """Statistics that caught reward hacking in published runs, for ``[B, 3, H, W]`` images in ``[0, 1]``:

    * ``brightness``: the mean pixel value (dimming pleased the digit classifier here);
    * ``dark_fraction`` / ``saturated_fraction``: pixels whose luminance (Rec. 601) is below 0.05 / above 0.95
      (blown-out or black images that please aesthetic or compressibility rewards);
    * ``colour_entropy``: the entropy in bits of the images' colours quantised to 4 levels per channel (64 bins;
      at most 6 bits; near 0 when every image is one flat colour).
    """
    x = images.detach().float().clamp(0, 1)
    luminance = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    levels = (x * 3.999).floor().long()  # 0..3 per channel
    bins = (levels[:, 0] * 16 + levels[:, 1] * 4 + levels[:, 2]).flatten()
    p = torch.bincount(bins, minlength=64).float()
    p = p[p > 0] / p.sum()
    return {"brightness": float(x.mean()), "dark_fraction": float((luminance < 0.05).float().mean()),
            "saturated_fraction": float((luminance > 0.95).float().mean()),
            "colour_entropy": float(-(p * p.log2()).sum())}
