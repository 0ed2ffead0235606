"""Prompt-image alignment: BERTScore recall of a VLM caption, on a tiny LLaVA and a tiny BERT."""

from __future__ import annotations

import math

import pytest
import torch

from diffrl.rewards import RewardError, load
from diffrl.rewards.alignment import AlignmentReward, bertscore, bertscore_recall
from diffrl.rewards.jpeg import jpeg_round_trip
from diffrl.rewards.preprocess import to_uint8_arrays


def test_bertscore_recall_by_hand():
    # Reference tokens r1 = (1, 0), r2 = (0, 1), a padding token; candidate tokens c1 = (1, 1), c2 = (1, 0).
    reference = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])
    candidate = torch.tensor([[[1.0, 1.0], [3.0, 0.0]]])
    recall = bertscore_recall(reference, torch.tensor([[True, True, False]]), candidate, torch.tensor([[True, True]]))
    # r1 best matches c2 (cos 1), r2 best matches c1 (cos 1/sqrt 2); the padding token is ignored.
    assert recall.item() == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    # Masking c2 out leaves c1 for both reference tokens.
    recall = bertscore_recall(reference, torch.tensor([[True, True, False]]), candidate, torch.tensor([[True, False]]))
    assert recall.item() == pytest.approx(1 / math.sqrt(2))
    # An empty caption scores 0.
    recall = bertscore_recall(reference, torch.tensor([[True, True, False]]), candidate, torch.tensor([[False, False]]))
    assert recall.item() == 0.0


def test_bertscore_precision_and_f1_by_hand():
    # Same pairs as above: precision matches each candidate token to its best reference token.
    reference = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])
    candidate = torch.tensor([[[1.0, 1.0], [3.0, 0.0]]])
    score = bertscore(reference, torch.tensor([[True, True, False]]), candidate, torch.tensor([[True, True]]))
    # c1 = (1, 1) is 1/sqrt 2 from both r1 and r2 (the padding token (5, 5) would be 1: it must not count); c2 = r1.
    precision, recall = (1 / math.sqrt(2) + 1) / 2, (1 + 1 / math.sqrt(2)) / 2
    assert score.precision.item() == pytest.approx(precision) and score.recall.item() == pytest.approx(recall)
    assert score.f1.item() == pytest.approx(2 * precision * recall / (precision + recall))
    empty = bertscore(reference, torch.tensor([[True, True, False]]), candidate, torch.tensor([[False, False]]))
    assert empty.precision.item() == empty.recall.item() == empty.f1.item() == 0.0


def test_defaults_follow_the_ddpo_reference():
    # ddpo-pytorch's llava_bertscore + LLaVA-server: the question, the reference, JPEG quality 80, at most 50 new
    # tokens, BERTScorer("microsoft/deberta-xlarge-mnli"), whose layer in bert_score's table is 40.
    reward = AlignmentReward()
    assert reward.question == "Answer concisely: what is going on in this image?"
    assert reward.reference.format(prompt="a cat") == "The image contains a cat"
    assert (reward.bert, reward.bert_layer) == ("microsoft/deberta-xlarge-mnli", 40)
    assert reward.jpeg_quality == 80 and reward.max_new_tokens == 50


def test_jpeg_round_trip_is_what_a_jpeg_file_decodes_to():
    images = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(3))
    decoded = jpeg_round_trip(images, 80)
    raw = to_uint8_arrays(images)
    assert [a.shape for a in decoded] == [(16, 24, 3)] * 2 and all(a.dtype == raw[0].dtype for a in decoded)
    error = [abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(decoded, raw)]
    assert all(0 < e < 128 for e in error)  # lossy (noise compresses badly), but the same picture
    assert (jpeg_round_trip(images, 95)[0] != decoded[0]).any()  # quality matters


@pytest.mark.parametrize("quality", [0, 101, 8.5, True])
def test_bad_jpeg_quality_is_named(quality):
    with pytest.raises(RewardError, match="jpeg_quality="):
        load("alignment", jpeg_quality=quality)


class _Recording:
    """Wraps a processor and keeps the images it was called with."""

    def __init__(self, processor):
        self.processor, self.images = processor, []

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def __call__(self, *, images, **kwargs):
        self.images += [a.copy() for a in images]
        return self.processor(images=images, **kwargs)


@pytest.mark.parametrize("quality", [80, None])
def test_the_vlm_sees_jpeg_compressed_images(tiny_llava, tiny_bert, quality):
    reward = load("alignment", vlm=str(tiny_llava), bert=str(tiny_bert), bert_layer=2, max_new_tokens=2,
                  jpeg_quality=quality)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    reward(images[:1], ["a cat"])  # loads the models
    processor, *models = reward._models
    recording = _Recording(processor)
    reward._models = (recording, *models)
    _, metadata = reward(images, ["a cat", "a dog"])
    expected = to_uint8_arrays(images) if quality is None else jpeg_round_trip(images, quality)
    assert len(recording.images) == 2
    assert all((seen == want).all() for seen, want in zip(recording.images, expected))
    assert metadata["precision"].shape == metadata["f1"].shape == (2,)


@pytest.fixture(scope="module")
def alignment(tiny_llava, tiny_bert):
    return load("alignment", vlm=str(tiny_llava), bert=str(tiny_bert), bert_layer=2, max_new_tokens=4, batch_size=2)


def test_reward_shapes_captions_and_references(alignment):
    images = torch.rand(3, 3, 24, 20, generator=torch.Generator().manual_seed(0), requires_grad=True)
    prompts = ["a cat riding a bike", "a dog playing chess", "a horse washing dishes"]
    values, metadata = alignment(images, prompts, [{}, {}, {}])
    assert not alignment.differentiable and not values.requires_grad
    assert values.shape == (3,) and values.dtype == torch.float32
    assert ((values >= -1) & (values <= 1)).all()
    assert metadata["references"] == [f"The image contains {p}" for p in prompts]
    assert len(metadata["captions"]) == 3 and all(isinstance(c, str) for c in metadata["captions"])


def test_batches_give_the_same_captions(alignment, tiny_llava, tiny_bert):
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    one_by_one = load("alignment", vlm=str(tiny_llava), bert=str(tiny_bert), bert_layer=2, max_new_tokens=4, batch_size=1)
    values, metadata = alignment(images, ["a cat"] * 3)
    values_1, metadata_1 = one_by_one(images, ["a cat"] * 3)
    assert metadata["captions"] == metadata_1["captions"]
    torch.testing.assert_close(values, values_1)


def test_identical_text_has_recall_one(alignment):
    embeddings, mask = alignment._embed(["The image contains a cat playing chess"] * 2)
    recall = bertscore_recall(embeddings, mask, embeddings, mask)
    torch.testing.assert_close(recall, torch.ones(2))
    assert mask.sum(-1).tolist() == [7, 7]  # [CLS] and [SEP] do not count


def test_bfloat16_runs(alignment):
    values, _ = alignment(torch.rand(2, 3, 16, 16).to(torch.bfloat16), ["a cat", "a dog"])
    assert values.dtype == torch.float32 and values.shape == (2,)


def test_bert_layer_out_of_range_is_named(tiny_llava, tiny_bert):
    reward = load("alignment", vlm=str(tiny_llava), bert=str(tiny_bert), bert_layer=17)
    with pytest.raises(RewardError, match="bert_layer=17 but bert=.* has 3 layers"):
        reward(torch.rand(1, 3, 16, 16), ["a cat"])
