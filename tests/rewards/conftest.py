"""Tiny random-weight reward models, built once per test session and saved like Hub repos."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffrl.testing.rewards import (
    make_tiny_aesthetic_mlp,
    make_tiny_bert,
    make_tiny_clip,
    make_tiny_llava,
    make_tiny_vit_classifier,
)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def tiny_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_aesthetic_mlp(tmp_path_factory.mktemp("mlp") / "aesthetic.safetensors", input_size=16)


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vit_classifier(tmp_path_factory.mktemp("vit"), num_labels=9)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert"))
