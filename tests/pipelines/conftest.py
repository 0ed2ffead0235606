"""Fixtures of the policy tests: a Stable Diffusion 2.x-shaped (v-prediction) tiny model on disk."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_sd2_path(tmp_path_factory):
    from diffrl.testing.models import save_tiny_stable_diffusion

    return str(save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd2"), version=2))
