"""docs/api.md is what scripts/api_reference.py generates from the code (so the reference cannot go stale)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_api_reference_is_up_to_date():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "api_reference.py"), "--check"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert "### `diffrl.DDPOTrainer`" in page and "- `openai_vlm`" in page and "- `jsonl`" in page


def test_pdoc_builds_the_html_reference_from_the_docstrings(tmp_path):
    """The browsable reference (``pdoc diffrl``) builds from the package as installed: every public module renders,
    with the docstrings users read."""
    done = subprocess.run([sys.executable, "-m", "pdoc", "-o", str(tmp_path), "diffrl"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    top = (tmp_path / "diffrl.html").read_text(encoding="utf-8")
    assert "DDPOTrainer" in top and "GRPOTrainer" in top and "StableDiffusionXLPolicy" in top
    rewards_page = (tmp_path / "diffrl" / "rewards.html").read_text(encoding="utf-8")
    assert "RewardError" in rewards_page and "ImageReward" in rewards_page
    assert (tmp_path / "diffrl" / "prompts.html").is_file()
