"""The HTML report: grids, curves, metric table and config in one self-contained file; it renders in Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from diffrl import rewards
from diffrl.evaluate.compare import ModelSource, evaluate_models
from diffrl.evaluate.inputs import HELDOUT, TRAIN, PromptItem
from diffrl.evaluate.report import build_report, write_report
from diffrl.evaluate.sample import SampleSettings
from diffrl.pipelines.auto import load_policy

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
IMG_PNG = re.compile(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"')


@pytest.fixture(scope="module")
def evaluation(tiny_sd_path):
    base = load_policy(tiny_sd_path, use_lora=False)
    prompts = [PromptItem("a cat", {}, TRAIN), PromptItem("a <b>dog</b>", {}, TRAIN),
               PromptItem("a horse", {}, HELDOUT)]
    scorers = {"jpeg_compressibility": rewards.load("jpeg_compressibility"),
               "jpeg_incompressibility": rewards.load("jpeg_incompressibility")}
    tuned = load_policy(tiny_sd_path, use_lora=False)
    return evaluate_models([ModelSource.of("base", base), ModelSource.of("tuned", tuned)],
                           scorers, prompts, [0, 1, 2], SampleSettings(2, 5.0, 1.0, 8),
                           trained_reward="jpeg_compressibility")


def test_report_holds_grids_curves_table_and_config(evaluation, lora_run, tmp_path):
    path = write_report(tmp_path / "sub" / "report.html", evaluation=evaluation, runs={"tuned": lora_run},
                        config={"steps": 2})
    text = path.read_text(encoding="utf-8")
    # grids: 3 prompts x 2 models x 3 seeds thumbnails, plus the training curves, all embedded
    assert len(IMG_PNG.findall(text)) >= 3 * 2 * 3 + 2
    assert "Samples from the same noise" in text and "seed 2" in text
    assert 'alt="loss/policy"' in text and 'alt="reward/mean"' in text  # curves from metrics.jsonl
    assert "<table>" in text and "reward/jpeg_compressibility (trained)" in text
    assert "reward/jpeg_incompressibility (held-out)" in text and "tuned − base" in text
    assert "diversity (pixels, rms distance)" in text
    assert "a &lt;b&gt;dog&lt;/b&gt;" in text and "<b>dog</b>" not in text  # prompts are escaped
    assert "config.yaml" in text and "jpeg_compressibility" in text and "&quot;steps&quot;: 2" in text
    assert "<script" not in text and "http://" not in text and "https://" not in text  # self-contained


def test_run_only_report_and_missing_inputs(lora_run, tmp_path):
    text = build_report(runs=lora_run)
    assert "Training curves" in text and "Final training metrics" in text and IMG_PNG.search(text)
    with pytest.raises(ValueError, match="nothing to report"):
        build_report()
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        build_report(runs=tmp_path)


def _chromium() -> str | None:
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def test_report_renders_in_headless_chromium(evaluation, lora_run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the rendering check needs it")
    report = write_report(tmp_path / "report.html", evaluation=evaluation, runs={"tuned": lora_run})
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
           report.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert pixels.shape[:2] == (900, 1200)
    not_white = (pixels < 245).any(axis=2).mean()
    saturated = (pixels.max(axis=2) - pixels.min(axis=2) > 60).mean()  # the sample images are colourful
    assert not_white > 0.03, f"the page looks blank ({not_white:.1%} non-white pixels)"
    assert saturated > 0.005, f"no image content visible ({saturated:.2%} colourful pixels)"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100


def test_a_grid_of_many_seeds_fits_the_page_and_scrolls_beyond(tiny_ddpm_path):
    from diffrl.evaluate.report import grid_section

    base = load_policy(tiny_ddpm_path, use_lora=False)
    seeds = list(range(16))
    evaluation = evaluate_models([ModelSource.of("base", base)], {"jpeg": rewards.load("jpeg_compressibility")},
                                 [PromptItem("", {}, TRAIN)], seeds, SampleSettings(2, 1.0, 1.0, 16),
                                 preview_seeds=16)
    body = grid_section(evaluation).body
    widths = [int(w) for w in re.findall(r'<img [^>]*width="(\d+)"', body)]
    assert len(widths) == 16 and max(widths) * 16 <= 1000  # the 16-seed row of the quickstart fits the page
    assert '<div class="scroll"><table class="grid">' in body  # wider grids scroll in their own box


def test_a_curve_constant_up_to_rounding_draws_flat():
    from diffrl.evaluate.plots import value_range

    lo, hi = value_range(-1e-7, 1e-7)  # reward/max of a run whose best sample scores 0 every epoch
    assert hi - lo >= 1e-5 and lo < -1e-7 and hi > 1e-7
    lo, hi = value_range(-6.2e-7, -1.2e-7)  # the quickstart's reward/max: float32 steps near log p = 0
    assert (-1.2e-7 - -6.2e-7) / (hi - lo) < 0.06  # drawn flat (5% of the height), not as a full-height zigzag
    lo, hi = value_range(0.9999999, 1.0000001)
    assert hi - lo == pytest.approx(1e-3)
    assert value_range(0.2, 0.8) == (0.2, 0.8)  # a real change keeps its own range


def test_a_sixteen_seed_report_has_no_horizontal_overflow_at_1280_px(tiny_ddpm_path, lora_run, tmp_path):
    """The quickstart's report shape (16 seeds shown) in a real browser: the page is no wider than the window."""
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the rendering check needs it")
    base = load_policy(tiny_ddpm_path, use_lora=False)
    evaluation = evaluate_models([ModelSource.of("base", base), ModelSource.of("tuned", base)],
                                 {"jpeg": rewards.load("jpeg_compressibility")}, [PromptItem("", {}, TRAIN)],
                                 list(range(650, 666)), SampleSettings(2, 1.0, 1.0, 16), preview_seeds=16)
    report = write_report(tmp_path / "report.html", evaluation=evaluation, runs={"run": lora_run})
    probe = tmp_path / "probe.html"  # the report itself has no script; the probe adds one that reports the width
    probe.write_text(report.read_text(encoding="utf-8").replace(
        "</body>", "<script>document.body.setAttribute('data-width', document.documentElement.scrollWidth)"
                   "</script></body>"), encoding="utf-8")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900", "--virtual-time-budget=3000",
           "--dump-dom", probe.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = re.search(r'data-width="(\d+)"', done.stdout)
    assert found, done.stderr[-2000:]
    assert int(found.group(1)) <= 1280
