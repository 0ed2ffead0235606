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
