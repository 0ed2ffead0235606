"""The LAION aesthetic predictor on a tiny random CLIP."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from diffrl.rewards import RewardError, load
from diffrl.rewards.aesthetic import AestheticMLP, load_aesthetic_mlp
from diffrl.testing.rewards import make_tiny_aesthetic_mlp


def test_mlp_layout_is_laions():
    mlp = AestheticMLP()
    assert list(mlp.state_dict()) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    widths = [(m.in_features, m.out_features) for m in mlp.layers if isinstance(m, torch.nn.Linear)]
    assert widths == [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    dropouts = {i: m.p for i, m in enumerate(mlp.layers) if isinstance(m, torch.nn.Dropout)}
    assert dropouts == {1: 0.2, 3: 0.2, 5: 0.1}
    assert not any(isinstance(m, (torch.nn.ReLU, torch.nn.GELU)) for m in mlp.modules())


def test_pth_and_safetensors_load_the_same_weights(tmp_path):
    pth = make_tiny_aesthetic_mlp(tmp_path / "mlp.pth", input_size=16, pickle=True)
    st = make_tiny_aesthetic_mlp(tmp_path / "mlp.safetensors", input_size=16)
    a, b = load_aesthetic_mlp(pth), load_aesthetic_mlp(st)
    assert a.input_size == 16
    for key, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[key])


class _Payload:
    """Unpickling this creates the marker file: the test checks that it never happens."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_with_code_is_refused(tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "code-ran"
    with open(path, "wb") as handle:
        pickle.dump({"layers.0.weight": _Payload(marker)}, handle, protocol=2)
    with pytest.raises(RewardError, match="refusing to unpickle"):
        load_aesthetic_mlp(path)
    assert not marker.exists()


def test_a_file_with_other_keys_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(1, 4)}, path)
    with pytest.raises(RewardError, match="does not hold the LAION aesthetic MLP"):
        load_aesthetic_mlp(path)


def test_scores_match_a_hand_computed_reference(tiny_clip, tiny_mlp):
    from transformers import CLIPModel

    reward = load("aesthetic", clip_model=str(tiny_clip), mlp=str(tiny_mlp))
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    values, _ = reward(images, ["a"] * 3, [{}] * 3)
    assert values.shape == (3,) and values.dtype == torch.float32
    # Reference: CLIP's image features of the normalised 32x32 input, L2-normalised, through the MLP.
    clip = CLIPModel.from_pretrained(tiny_clip).eval()
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        features = clip.visual_projection(clip.vision_model(pixel_values=(images - mean) / std).pooler_output)
        expected = load_aesthetic_mlp(tiny_mlp).eval()(features / features.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(values, expected)
    again, _ = reward(images)
    torch.testing.assert_close(values, again)  # eval mode: dropout is off


def test_gradients_reach_the_images(tiny_clip, tiny_mlp):
    reward = load("aesthetic", clip_model=str(tiny_clip), mlp=str(tiny_mlp))
    assert reward.differentiable
    images = torch.rand(2, 3, 48, 40, requires_grad=True)
    values, _ = reward(images)
    values.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in reward._clip.parameters())


def test_no_grad_path_agrees_with_the_differentiable_one(tiny_clip, tiny_mlp):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    images = (images * 255).round() / 255
    smooth = torch.nn.functional.avg_pool2d(images, 5, stride=1, padding=2)  # keep resampling differences small
    exact = load("aesthetic", clip_model=str(tiny_clip), mlp=str(tiny_mlp), differentiable=False)
    assert not exact.differentiable
    reference, _ = exact(smooth)
    assert not reference.requires_grad
    ours, _ = load("aesthetic", clip_model=str(tiny_clip), mlp=str(tiny_mlp))(smooth)
    torch.testing.assert_close(ours, reference, atol=0.02, rtol=0.0)


def test_runs_in_bfloat16_close_to_float32(tiny_clip, tiny_mlp):
    reward = load("aesthetic", clip_model=str(tiny_clip), mlp=str(tiny_mlp))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    full, _ = reward(images)
    half, _ = reward(images.to(torch.bfloat16))
    assert half.dtype == torch.float32
    assert next(reward._clip.parameters()).dtype == torch.bfloat16  # follows the caller's dtype
    torch.testing.assert_close(half, full, atol=0.05, rtol=0.05)


def test_model_loads_once(tiny_clip, tiny_mlp):
    reward = load("aesthetic", clip_model=str(tiny_clip), mlp=str(tiny_mlp), dtype="float32")
    reward(torch.rand(1, 3, 32, 32))
    clip = reward._clip
    reward(torch.rand(1, 3, 32, 32).to(torch.bfloat16))
    assert reward._clip is clip and next(clip.parameters()).dtype == torch.float32  # dtype option wins


def test_mlp_directory_and_mismatched_width(tiny_clip, tmp_path):
    make_tiny_aesthetic_mlp(tmp_path / "aesthetic-model.pth", input_size=16, pickle=True)
    values, _ = load("aesthetic", clip_model=str(tiny_clip), mlp=str(tmp_path))(torch.rand(1, 3, 32, 32))
    assert values.shape == (1,)
    wide = make_tiny_aesthetic_mlp(tmp_path / "wide.safetensors", input_size=768)
    with pytest.raises(RewardError, match="expects 768-d embeddings"):
        load("aesthetic", clip_model=str(tiny_clip), mlp=str(wide))(torch.rand(1, 3, 32, 32))
