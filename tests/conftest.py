"""Shared fixtures: tiny random-weight models saved to disk once per test session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Tiny models gain nothing from intra-op threads, and on a small shared machine two threads per op
# fight over the cores (measured: tests/recipes/test_ddpo.py 248 s with the default, 10 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    from diffrl.testing.models import save_tiny_stable_diffusion

    return str(save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="session")
def tiny_ddpm_path(tmp_path_factory):
    from diffrl.testing.models import save_tiny_ddpm

    return str(save_tiny_ddpm(tmp_path_factory.mktemp("tiny-ddpm")))


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    from diffrl.testing.sdxl import save_tiny_sdxl

    return str(save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl")))


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory):
    from diffrl.testing.flow import save_tiny_sd3

    return str(save_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3")))


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory):
    from diffrl.testing.flow import save_tiny_flux

    return str(save_tiny_flux(tmp_path_factory.mktemp("tiny-flux")))
