"""Tests for diffrl.digits: the shipped digit DDPM, the classifier and the digit reward."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline

from diffrl.digits import (
    DigitClassifier,
    DigitReward,
    digit_shares,
    load_digit_classifier,
    load_digits_ddpm_path,
)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_digits.py"


@pytest.fixture(scope="module")
def classifier() -> DigitClassifier:
    return load_digit_classifier()


@pytest.fixture(scope="module")
def sk_digits() -> tuple[torch.Tensor, torch.Tensor]:
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target)


def test_shipped_ddpm_loads_as_ddpm_pipeline() -> None:
    pipe = DDPMPipeline.from_pretrained(load_digits_ddpm_path())
    assert pipe.unet.config.sample_size == 8
    assert pipe.unet.config.in_channels == pipe.unet.config.out_channels == 1
    assert sum(p.numel() for p in pipe.unet.parameters()) < 1_000_000
    assert pipe.scheduler.config.steps_offset == 1
    assert pipe.scheduler.config.set_alpha_to_one is False
    with torch.no_grad():
        out = pipe.unet(torch.zeros(2, 1, 8, 8), 10).sample
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_shipped_classifier_is_accurate_on_sklearn_digits(classifier, sk_digits) -> None:
    images, labels = sk_digits
    with torch.no_grad():
        accuracy = (classifier(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.95


def test_classifier_averages_three_channels(classifier, sk_digits) -> None:
    grey = sk_digits[0][:16]
    with torch.no_grad():
        torch.testing.assert_close(classifier(grey.repeat(1, 3, 1, 1)), classifier(grey))
    with pytest.raises(ValueError, match=r"\(4, 2, 8, 8\)"):
        classifier(torch.zeros(4, 2, 8, 8))


def test_classifier_save_load_round_trip(classifier, tmp_path: Path) -> None:
    classifier.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "config.json"}
    again = load_digit_classifier(tmp_path, dtype=torch.float64)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(x.double()).float(), classifier(x), rtol=1e-4, atol=1e-4)


def test_digit_reward_shapes_and_gradients(sk_digits) -> None:
    images, labels = sk_digits
    target = 3
    batch = images[:32].repeat(1, 3, 1, 1).requires_grad_(True)
    reward = DigitReward(target)
    assert reward.differentiable is True
    rewards, meta = reward(batch, [""] * 32, [{}] * 32)
    assert rewards.shape == (32,) and (rewards <= 0).all()
    assert meta["predicted"].shape == (32,)
    expected_share = (meta["predicted"] == target).float().mean().item()
    assert meta["target_share"] == pytest.approx(expected_share)
    assert meta["target_share"] == pytest.approx((labels[:32] == target).float().mean().item(), abs=0.07)
    rewards.sum().backward()
    assert batch.grad is not None and batch.grad.abs().sum() > 0

    probs, _ = DigitReward(target, kind="prob")(batch.detach(), [], [])
    torch.testing.assert_close(probs, rewards.detach().exp())


def test_digit_reward_follows_input_dtype() -> None:
    rewards, _ = DigitReward(0)(torch.rand(2, 3, 8, 8, dtype=torch.float64), [], [])
    assert rewards.dtype == torch.float64


@pytest.mark.parametrize("target", [-1, 10, "3", 2.0, True])
def test_digit_reward_rejects_bad_target(target) -> None:
    with pytest.raises(ValueError, match=repr(target).replace(".", r"\.")):
        DigitReward(target)  # type: ignore[arg-type]


def test_digit_reward_rejects_bad_kind() -> None:
    with pytest.raises(ValueError, match="'logit'"):
        DigitReward(1, kind="logit")  # type: ignore[arg-type]


def test_digit_shares_of_real_digits(classifier, sk_digits) -> None:
    images, labels = sk_digits
    shares = digit_shares(images, classifier)
    assert shares.shape == (10,)
    assert shares.sum().item() == pytest.approx(1.0)
    true_shares = torch.bincount(labels, minlength=10).float() / len(labels)
    torch.testing.assert_close(shares, true_shares, atol=0.02, rtol=0)


def test_shipped_ddpm_samples_every_digit(classifier) -> None:
    """The issue's criterion, through the sampler diffrl fine-tunes with: 500 DDIM (eta=1, 20 steps) samples
    from diffrl's DDPM policy, no digit below 5%."""
    from diffrl.pipelines import DDPMPolicy

    policy = DDPMPolicy.from_pretrained(load_digits_ddpm_path(), use_lora=False)
    with torch.no_grad():
        traj = policy.sample(batch_size=500, num_inference_steps=20, eta=1.0,
                             generator=torch.Generator().manual_seed(2)).trajectory
    shares = digit_shares(traj.images, classifier)
    assert shares.min().item() >= 0.05, shares.tolist()


def test_pretrain_script_quick_mode(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)], check=True, timeout=300)
    pipe = DDPMPipeline.from_pretrained(tmp_path / "ddpm")
    assert pipe.scheduler.config.steps_offset == 1
    assert isinstance(load_digit_classifier(tmp_path / "classifier"), DigitClassifier)
    assert (tmp_path / "report.json").is_file()
