"""Prompt-image alignment: BERTScore recall of a VLM caption, on a tiny LLaVA and a tiny BERT."""

from __future__ import annotations

import math

import pytest
import torch

from diffrl.rewards import RewardError, load
from diffrl.rewards.alignment import bertscore_recall


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
