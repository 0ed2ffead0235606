"""From a model output to the ``(x_0, epsilon)`` pair, for every prediction type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch

PredictionType = Literal["epsilon", "v_prediction", "sample"]


@dataclass(frozen=True)
class PredictionConfig:
    """The scheduler settings that shape ``x_0``-prediction (names follow diffusers' scheduler configs).

    Attributes:
        prediction_type: what the network predicts: noise ``epsilon``, velocity ``v_prediction``
            (Salimans & Ho 2022) or the clean ``sample``.
        clip_sample: clamp the predicted ``x_0`` to ``[-clip_sample_range, clip_sample_range]``.
        clip_sample_range: the clamp bound.
        thresholding: dynamic thresholding (Saharia et al. 2022, Imagen, sec. 2.3); takes precedence over clipping.
        dynamic_thresholding_ratio: the percentile of ``|x_0|`` used as the threshold ``s``.
        sample_max_value: upper bound on ``s``.
    """

    prediction_type: PredictionType = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"prediction_type={self.prediction_type!r} is not supported; "
                "use 'epsilon', 'v_prediction' or 'sample'."
            )

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> "PredictionConfig":
        """Read the fields from a diffusers scheduler config (missing keys take diffusers' defaults)."""
        defaults = cls()
        return cls(
            prediction_type=config.get("prediction_type", defaults.prediction_type),
            clip_sample=bool(config.get("clip_sample", defaults.clip_sample)),
            clip_sample_range=float(config.get("clip_sample_range", defaults.clip_sample_range)),
            thresholding=bool(config.get("thresholding", defaults.thresholding)),
            dynamic_thresholding_ratio=float(
                config.get("dynamic_thresholding_ratio", defaults.dynamic_thresholding_ratio)
            ),
            sample_max_value=float(config.get("sample_max_value", defaults.sample_max_value)),
        )


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding: ``s = clamp(quantile(|x0|, ratio), 1, max)``, ``x0 <- clamp(x0, -s, s) / s``."""
    flat = x0.reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs().float(), ratio, dim=1).clamp(min=1.0, max=max_value).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def predict_x0_and_eps(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor,
    config: PredictionConfig,
    use_clipped_model_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate ``x_0`` and ``epsilon`` from the network output at ``x_t``.

    With ``abar = alpha_prod_t`` (DDIM paper notation ``alpha_t``; Song et al. 2021, eq. 12):
    ``epsilon``: ``x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)``;
    ``v_prediction``: ``x0 = sqrt(abar) x_t - sqrt(1 - abar) v``, ``eps = sqrt(abar) v + sqrt(1 - abar) x_t``;
    ``sample``: ``eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)``.
    ``x0`` is then thresholded or clipped per ``config``; with ``use_clipped_model_output``
    ``eps`` is re-derived from the clipped ``x0`` (as GLIDE and diffusers do).

    ``alpha_prod_t`` must broadcast against ``sample`` (shape ``[B, 1, ..., 1]`` or scalar).
    """
    sqrt_a, sqrt_b = alpha_prod_t.sqrt(), (1 - alpha_prod_t).sqrt()
    if config.prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sqrt_b * eps) / sqrt_a
    elif config.prediction_type == "v_prediction":
        x0 = sqrt_a * sample - sqrt_b * model_output
        eps = sqrt_a * model_output + sqrt_b * sample
    else:
        x0 = model_output
        eps = (sample - sqrt_a * x0) / sqrt_b
    if config.thresholding:
        x0 = dynamic_threshold(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
    elif config.clip_sample:
        x0 = x0.clamp(-config.clip_sample_range, config.clip_sample_range)
    if use_clipped_model_output:
        eps = (sample - sqrt_a * x0) / sqrt_b
    return x0, eps
