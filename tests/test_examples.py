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


def _run_example(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--smoke", *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _lora_metadata(folder: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt") as weights:
        return json.loads(weights.metadata()["lora_adapter_metadata"])


def test_own_reward_on_sd15_trains_a_lora_that_plain_diffusers_loads(tiny_sd_path, tmp_path):
    done = _run_example("sd15_own_reward.py", "--model", tiny_sd_path, "--logdir", str(tmp_path))
    assert "StableDiffusionPipeline.load_lora_weights loads it" in done.stdout
    final = tmp_path / "sd15-colour" / "final"
    assert _lora_metadata(final)["unet.lora_alpha"] == 16 and _lora_metadata(final)["unet.r"] == 4
    rows = [json.loads(line) for line in (tmp_path / "sd15-colour" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and 0 < rows[0]["reward/mean"] < 1  # colourfulness of 4 images


def test_sdxl_lora_ddpo_example_loads_into_stable_diffusion_xl_pipeline(tiny_sdxl_path, tmp_path):
    done = _run_example("sdxl_lora_ddpo.py", "--model", tiny_sdxl_path, "--size", "64", "--logdir", str(tmp_path))
    assert "StableDiffusionXLPipeline.load_lora_weights loads it (an image of (1, 3, 64, 64))" in done.stdout
    assert _lora_metadata(tmp_path / "sdxl-jpeg" / "final")["unet.r"] == 8


def test_grpo_example_scores_the_datasets_prompts_with_their_metadata(tiny_sd_path, tmp_path):
    import datasets

    texts = [f"a photo of a {w}" for w in "cat dog bird fish horse".split()]
    datasets.Dataset.from_dict({"Prompt": texts, "Category": ["Animals"] * 5}).save_to_disk(str(tmp_path / "parti"))
    (tmp_path / "recorder.py").write_text(
        "import json, os\n"
        "def record(images, prompts, prompt_metadata):\n"
        "    with open(os.environ['RECORD_TO'], 'a') as f:\n"
        "        for p, m in zip(prompts, prompt_metadata):\n"
        "            f.write(json.dumps([p, m]) + '\\n')\n"
        "    return images.mean(dim=(1, 2, 3)), {}\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), RECORD_TO=str(tmp_path / "scored.jsonl"), HF_DATASETS_OFFLINE="1")
    done = _run_example("grpo_hub_prompts.py", "--model", tiny_sd_path, "--dataset", str(tmp_path / "parti"),
                        "--reward", "recorder:record", "--logdir", str(tmp_path / "logs"), env=env)
    assert "reward/mean of the last epoch" in done.stdout
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert len(scored) >= 4 and all(p in texts and m == {"Category": "Animals"} for p, m in scored)
    assert len({p for p, _ in scored}) >= 2  # two groups of 2: two prompts (plus the evaluation's)
