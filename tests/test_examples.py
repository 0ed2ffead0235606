"""The examples in examples/ run as their README says (smoke settings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ddpo_from_python_trains_and_saves_what_diffusers_loads(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "ddpo_from_python.py"), "--epochs", "1",
                           "--logdir", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DDPMPipeline.from_pretrained loads it (4 images" in done.stdout
    assert list((tmp_path / "example" / "images").rglob("*best_of_step_*.png"))  # the hook saved its picks


def test_the_custom_reward_example_trains_by_reference(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "examples" / "custom_reward"))
    done = subprocess.run([sys.executable, "-m", "diffrl", "train", "reward=my_rewards:Darkness",
                           "reward_options.strength=2", "num_epochs=1", "sample_num_steps=4", "eval_num_samples=16",
                           f"logdir={tmp_path}", "run_name=ex"], capture_output=True, text=True, timeout=600,
                          env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "ex" / "summary.json").read_text())
    assert summary["reward"] == "my_rewards:Darkness" and summary["reward_before"] < 0  # -2 x mean pixel
