"""``diffrl.models.auxiliary_modules.aesthetic_scorer``: TRL's call, diffrl's aesthetic reward."""

from __future__ import annotations

import torch

from diffrl.models.auxiliary_modules import aesthetic_scorer
from diffrl.rewards.aesthetic import AestheticScore
from diffrl.testing.rewards import make_tiny_aesthetic_mlp, make_tiny_clip


def test_trl_signature_scores_like_the_aesthetic_reward_with_gradients(tmp_path) -> None:
    clip = make_tiny_clip(tmp_path / "clip")
    make_tiny_aesthetic_mlp(tmp_path / "mlp" / "aesthetic-model.safetensors", input_size=16)
    # TRL's call: aesthetic_scorer(hub_model_id, model_filename) -> fn(images, prompts, metadata)
    fn = aesthetic_scorer(str(tmp_path / "mlp"), "aesthetic-model.safetensors", clip_model=str(clip))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1  # TRL clamps
    images.requires_grad_(True)
    scores, metadata = fn(images, ["a cat", "a dog"], [{}, {}])
    assert scores.shape == (2,) and metadata == {} and fn.differentiable
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    direct = AestheticScore(mlp=str(tmp_path / "mlp"), mlp_file="aesthetic-model.safetensors", clip_model=str(clip))
    expected, _ = direct(images.detach().clamp(0, 1))
    torch.testing.assert_close(scores.detach(), expected)
