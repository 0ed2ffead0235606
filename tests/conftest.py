"""Shared fixtures: tiny random-weight models saved to disk once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    from diffrl.testing.models import save_tiny_stable_diffusion

    return str(save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="session")
def tiny_ddpm_path(tmp_path_factory):
    from diffrl.testing.models import save_tiny_ddpm

    return str(save_tiny_ddpm(tmp_path_factory.mktemp("tiny-ddpm")))
