"""Configs shipped with the package (the offline quickstart's default)."""

from pathlib import Path

PRESETS_DIR = Path(__file__).parent


def preset_path(name: str) -> Path:
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no preset named '{name}'; shipped presets: {known}")
    return path
