from pathlib import Path

import pytest

from diffrl.config import load_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_preset_loads_validates_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Run:") and f"configs/{path.name}" in first
    processes = int(first.split("--num_processes")[1].split()[0]) if "--num_processes" in first else 1
    config = load_config(path)
    config.validate(num_processes=processes, check_environment=False)
    assert config.model and config.reward and config.prompts


def test_presets_exist():
    names = {p.stem for p in CONFIGS}
    assert {"ddpo_compressibility", "ddpo_incompressibility", "ddpo_aesthetic", "ddpo_alignment",
            "ddpm_celebahq_over50", "alignprop_aesthetic"} <= names
