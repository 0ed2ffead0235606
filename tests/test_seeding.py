"""The seed derivation of every random stream (diffrl.seeding)."""

import itertools

import pytest
import torch

from diffrl.seeding import Stream, generator_for, image_generator, stream_seed


def test_tuples_with_leading_zeros_or_other_lengths_get_different_seeds():
    # The polynomial fold this replaced gave (0, 1) and (0, 0, 1) the same seed (NFT's sample batch 1 and its
    # epoch-0 shuffle drew the same noise with seed=0).
    assert stream_seed(Stream.SHUFFLE, 0, 1) != stream_seed(Stream.SHUFFLE, 0, 0, 1)
    assert stream_seed(Stream.SHUFFLE, 1) != stream_seed(Stream.SHUFFLE, 0, 1)
    assert stream_seed(Stream.SHUFFLE) != stream_seed(Stream.SHUFFLE, 0)
    tuples = [t for n in range(5) for t in itertools.product(range(4), repeat=n)]
    seeds = {(s, t): stream_seed(s, *t) for s in Stream for t in tuples}
    assert len(set(seeds.values())) == len(seeds)
    # torch seeds its CPU generator's mt19937 with the low 32 bits: those are distinct too.
    assert len({v % 2**32 for v in seeds.values()}) == len(seeds)


def test_streams_are_separate_and_reproducible():
    a = torch.randn(4, generator=generator_for(Stream.SAMPLE_NOISE, 0, 0, 0, 1))
    b = torch.randn(4, generator=generator_for(Stream.SHUFFLE, 0, 0, 0, 1))
    assert not torch.equal(a, b)
    assert torch.equal(a, torch.randn(4, generator=generator_for("sample_noise", 0, 0, 0, 1)))
    assert 0 <= stream_seed(Stream.PLAN, -5, 2**40) < 2**63


def test_an_unknown_stream_is_refused():
    with pytest.raises(ValueError, match="noise"):
        generator_for("noise", 0)


def test_evaluation_images_use_plain_torch_seeds():
    assert torch.equal(torch.randn(3, generator=image_generator(650)),
                       torch.randn(3, generator=torch.Generator().manual_seed(650)))
