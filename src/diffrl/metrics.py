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
