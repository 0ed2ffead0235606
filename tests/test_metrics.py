"""Hand-worked numbers for mean ± standard error, paired differences and diversity."""

import math

import pytest
import torch

from diffrl.metrics import MeanSE, diversity, mean_se, paired_difference, pairwise_distances


def test_mean_se_by_hand():
    # values 1, 2, 3, 4: mean 2.5, sample std sqrt(5/3), se = sqrt(5/3) / 2
    out = mean_se(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert out.n == 4 and out.mean == pytest.approx(2.5)
    assert out.se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert out.format() == f"2.5 ± {math.sqrt(5 / 3) / 2:.2g}"


def test_mean_se_edge_cases_are_nan_and_json_safe():
    one = mean_se(torch.tensor([3.0]))
    assert one.mean == 3.0 and math.isnan(one.se) and one.to_dict() == {"mean": 3.0, "se": None, "n": 1}
    assert one.format() == "3"
    none = mean_se(torch.tensor([math.nan]))
    assert none.n == 0 and none.format() == "n/a"


def test_paired_difference_removes_shared_variation():
    base = torch.tensor([0.0, 10.0, 20.0, 30.0])
    tuned = base + torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert paired_difference(tuned, base) == MeanSE(1.0, 0.0, 4)
    with pytest.raises(ValueError, match="one to one"):
        paired_difference(tuned[:3], base)


def test_diversity_rms_by_hand():
    # rows 0, 0, 1 in 4 dims: distances 0, 1, 1 -> mean 2/3
    features = torch.tensor([[0.0] * 4, [0.0] * 4, [1.0] * 4])
    assert diversity(features, "rms") == pytest.approx(2 / 3)
    assert diversity(features[:2], "rms") == 0.0
    assert math.isnan(diversity(features[:1], "rms"))


def test_cosine_distance_by_hand():
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    d = pairwise_distances(features, "cosine")
    assert d[0, 1] == pytest.approx(1.0) and d[0, 2] == pytest.approx(0.0) and d[1, 2] == pytest.approx(1.0)
    assert diversity(features, "cosine") == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="unknown distance metric"):
        pairwise_distances(features, "l1")


def test_image_statistics_name_the_signs_of_reward_hacking():
    from diffrl.metrics import image_statistics

    black = torch.zeros(2, 3, 4, 4)
    stats = image_statistics(black)
    assert stats == {"brightness": 0.0, "dark_fraction": 1.0, "saturated_fraction": 0.0, "colour_entropy": 0.0}
    white = torch.ones(2, 3, 4, 4)
    assert image_statistics(white)["saturated_fraction"] == 1.0
    # half red, half blue pixels: two colour bins of equal weight, one bit
    split = torch.zeros(1, 3, 2, 2)
    split[0, 0, 0] = 1.0
    split[0, 2, 1] = 1.0
    assert image_statistics(split)["colour_entropy"] == pytest.approx(1.0)
    noise = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert image_statistics(noise)["colour_entropy"] == pytest.approx(6.0, abs=0.05)  # 64 bins, near uniform
