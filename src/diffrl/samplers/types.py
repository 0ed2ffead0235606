"""Typed containers shared by the samplers."""

from __future__ import annotations

from typing import NamedTuple

import torch


class StepOutput(NamedTuple):
    """One reverse-diffusion transition ``x_t -> x_{t'}`` (``t' < t``).

    Shapes: ``B`` batch, ``*S`` sample dimensions (``C, H, W``).

    Attributes:
        prev_sample: ``[B, *S]`` the next sample ``x_{t'}``: drawn, or the one given to evaluate.
        mean: ``[B, *S]`` mean of the Gaussian transition ``p(x_{t'} | x_t)``.
        std: ``[B, 1, ..., 1]`` its standard deviation (broadcastable to ``[B, *S]``).
        log_prob: ``[B]`` log-density of ``prev_sample`` under that Gaussian, averaged over ``*S``
            (see :func:`diffrl.samplers.gaussian.gaussian_log_prob`); ``None`` when not requested.
        pred_original_sample: ``[B, *S]`` the model's estimate of ``x_0`` after clipping/thresholding.
    """

    prev_sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor | None
    pred_original_sample: torch.Tensor
