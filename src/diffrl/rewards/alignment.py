"""Prompt-image alignment, the DDPO paper's VLM reward (Black et al. 2023, sec. 6.3).

A vision-language model answers "Answer concisely: what is going on in this image?"; the reward
is the BERTScore recall (Zhang et al. 2020, "BERTScore: Evaluating Text Generation with BERT",
sec. 3, R_BERT) of its answer against the reference "The image contains {prompt}": each
reference token is matched greedily to its most similar answer token by cosine similarity of
contextual embeddings, and the similarities are averaged over the reference tokens.

The defaults are the reference implementation's (ddpo-pytorch's ``llava_bertscore`` with the
LLaVA-server repository): that question and reference, the images JPEG-compressed at quality 80
before the VLM sees them, at most 50 new tokens, greedy decoding, and BERTScore with
``microsoft/deberta-xlarge-mnli`` at layer 40 (the layer the ``bert_score`` package uses for
that model), no idf weighting, no baseline rescaling. Where diffrl differs (the VLM is
LLaVA-1.5 through transformers and its chat template) docs/rewards.md says why. Any
transformers image-text-to-text model works, and ``diffrl serve-reward`` can host the reward
on another GPU or machine (:mod:`diffrl.rewards.server`), as the paper did. Not differentiable.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from diffrl.rewards._loading import ModelReward, freeze, from_pretrained, place
from diffrl.rewards.base import PromptMetadata, Prompts, RewardError, RewardOutput, check_positive
from diffrl.rewards.jpeg import check_quality, jpeg_round_trip
from diffrl.rewards.preprocess import to_uint8_arrays

__all__ = ["AlignmentReward", "BertScore", "bertscore", "bertscore_recall"]

QUESTION = "Answer concisely: what is going on in this image?"
"""The question ddpo-pytorch's ``llava_bertscore`` asks the VLM about every image."""
BERT = "microsoft/deberta-xlarge-mnli"
"""The embedding model of LLaVA-server's BERTScore (``BERTScorer("microsoft/deberta-xlarge-mnli")``)."""
BERT_LAYER = 40
"""The hidden state ``bert_score`` uses for deberta-xlarge-mnli (of 48; its ``model2layers`` table, chosen by
correlation with human judgements on WMT16)."""

FALLBACK_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
"""LLaVA-1.5's prompt format, used when the processor has no chat template."""


class BertScore(NamedTuple):
    """BERTScore per candidate/reference pair (Zhang et al. 2020, sec. 3); each ``[B]`` float32."""

    precision: torch.Tensor
    """``mean_j max_i cos(ref_i, cand_j)``: how much of the candidate the reference covers."""
    recall: torch.Tensor
    """``mean_i max_j cos(ref_i, cand_j)``: how much of the reference the candidate covers (DDPO's reward)."""
    f1: torch.Tensor
    """``2 P R / (P + R)`` (0 where both are 0)."""


def bertscore(
    reference: torch.Tensor, reference_mask: torch.Tensor, candidate: torch.Tensor, candidate_mask: torch.Tensor
) -> BertScore:
    """BERTScore precision, recall and F1 per pair, from token embeddings, with greedy matching and no idf.

    ``reference`` ``[B, Lr, D]`` and ``candidate`` ``[B, Lc, D]`` are token embeddings;
    the boolean masks ``[B, Lr]``, ``[B, Lc]`` mark the tokens that count (not padding,
    not special tokens). A side without tokens scores 0.
    """
    reference = reference.float() / torch.linalg.vector_norm(reference.float(), dim=-1, keepdim=True)
    candidate = candidate.float() / torch.linalg.vector_norm(candidate.float(), dim=-1, keepdim=True)
    similarity = reference @ candidate.transpose(1, 2)  # [B, Lr, Lc]
    both = reference_mask[:, :, None] & candidate_mask[:, None, :]
    similarity = similarity.masked_fill(~both, float("-inf"))
    recall = _masked_mean(similarity.max(dim=-1).values, reference_mask)  # greedy match of each reference token
    precision = _masked_mean(similarity.max(dim=-2).values, candidate_mask)  # ... and of each candidate token
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(recall))
    return BertScore(precision, recall, f1)


def _masked_mean(best: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    best = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
    weights = mask.float()
    return (best * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)


def bertscore_recall(
    reference: torch.Tensor, reference_mask: torch.Tensor, candidate: torch.Tensor, candidate_mask: torch.Tensor
) -> torch.Tensor:
    """BERTScore recall per pair, ``[B]``: ``mean_i max_j cos(ref_i, cand_j)`` (see :func:`bertscore`)."""
    return bertscore(reference, reference_mask, candidate, candidate_mask).recall


def _to(value: Any, like: torch.Tensor) -> Any:
    """Move a processor output to the model's device (and its float dtype, for pixel values)."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(like.device, like.dtype) if value.is_floating_point() else value.to(like.device)


class AlignmentReward(ModelReward):
    """BERTScore recall of a VLM's description of each image against "The image contains {prompt}".

    Options: ``vlm`` (a Hub id or local path loadable by ``AutoProcessor`` and
    ``AutoModelForImageTextToText``; LLaVA-1.5-7B by default), ``bert`` / ``bert_layer``
    (the embedding model and which hidden state to use; ``None`` is the last),
    ``question``, ``reference`` (a format string with ``{prompt}``), ``jpeg_quality`` (the
    images go to the VLM JPEG-compressed at this quality, as in ddpo-pytorch; ``None``: raw
    pixels), ``max_new_tokens``, ``batch_size`` (images per VLM call). Metadata holds the
    captions, the references and BERTScore's ``precision`` and ``f1`` per image.
    """

    name = "alignment"
    differentiable = False
    needs_prompts = True

    def __init__(
        self,
        *,
        vlm: str = "llava-hf/llava-1.5-7b-hf",
        bert: str = BERT,
        bert_layer: int | None = BERT_LAYER,
        question: str = QUESTION,
        reference: str = "The image contains {prompt}",
        jpeg_quality: int | None = 80,
        max_new_tokens: int = 50,
        batch_size: int = 8,
        device: str | None = None,
        dtype: str | None = None,
    ) -> None:
        check_positive(max_new_tokens, reward=self.name, setting="max_new_tokens", integer=True)
        check_positive(batch_size, reward=self.name, setting="batch_size", integer=True)
        if bert_layer is not None:
            check_positive(bert_layer, reward=self.name, setting="bert_layer", integer=True)
        if jpeg_quality is not None:
            check_quality(jpeg_quality, reward=self.name, setting="jpeg_quality")
        if "{prompt}" not in reference:
            raise RewardError(f"reward 'alignment': option reference={reference!r} must contain '{{prompt}}'")
        self.vlm, self.bert, self.bert_layer = vlm, bert, bert_layer
        self.question, self.reference, self.jpeg_quality = question, reference, jpeg_quality
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        super().__init__(device=device, dtype=dtype)
        self._models: tuple[Any, Any, Any, Any] | None = None

    def _load(self, dtype: torch.dtype) -> None:
        from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        processor = from_pretrained(AutoProcessor, self.vlm, reward=self.name, setting="vlm")
        processor.tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
        vlm = from_pretrained(AutoModelForImageTextToText, self.vlm, reward=self.name, setting="vlm", dtype=dtype)
        tokenizer = from_pretrained(AutoTokenizer, self.bert, reward=self.name, setting="bert")
        bert = from_pretrained(AutoModel, self.bert, reward=self.name, setting="bert", dtype=dtype)
        layers = bert.config.num_hidden_layers
        if self.bert_layer is not None and self.bert_layer > layers:
            raise RewardError(
                f"reward 'alignment': option bert_layer={self.bert_layer} but bert={self.bert!r} has {layers} layers; "
                f"pick 1..{layers} or leave it unset (null) for the last"
            )
        self._models = (processor, freeze(vlm), tokenizer, freeze(bert))

    def _vlm_prompt(self, processor: Any) -> str:
        if getattr(processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.question}]}]
            return processor.apply_chat_template(messages, add_generation_prompt=True)
        return FALLBACK_TEMPLATE.format(question=self.question)

    def describe(self, images: torch.Tensor) -> list[str]:
        """The VLM's answer to ``question`` for each image (greedy decoding)."""
        processor, vlm, _, _ = self._models
        parameter = next(vlm.parameters())
        text = self._vlm_prompt(processor)
        captions: list[str] = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start : start + self.batch_size]
            chunk = to_uint8_arrays(batch) if self.jpeg_quality is None else jpeg_round_trip(batch, self.jpeg_quality)
            inputs = processor(images=chunk, text=[text] * len(chunk), return_tensors="pt", padding=True)
            inputs = {key: _to(value, parameter) for key, value in inputs.items()}
            output = vlm.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            prompt_ids = inputs["input_ids"]
            if output.shape[1] >= prompt_ids.shape[1] and torch.equal(output[:, : prompt_ids.shape[1]], prompt_ids):
                output = output[:, prompt_ids.shape[1] :]  # decoder-only models echo the prompt
            captions += [caption.strip() for caption in processor.batch_decode(output, skip_special_tokens=True)]
        return captions

    def _embed(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        _, _, tokenizer, bert = self._models
        device = next(bert.parameters()).device
        tokens = tokenizer(
            texts, padding=True, truncation=True, return_special_tokens_mask=True, return_tensors="pt"
        ).to(device)
        special = tokens.pop("special_tokens_mask").bool()
        hidden = bert(**tokens, output_hidden_states=True).hidden_states
        layer = hidden[self.bert_layer] if self.bert_layer is not None else hidden[-1]
        return layer, tokens["attention_mask"].bool() & ~special

    def score_images(self, images: torch.Tensor, prompts: Prompts, prompt_metadata: PromptMetadata) -> RewardOutput:
        device, dtype = self._prepare(images)
        place(self._models[1], device, dtype)
        place(self._models[3], device, dtype)
        references = [self.reference.format(prompt=prompt) for prompt in prompts]
        with torch.no_grad():
            captions = self.describe(images)
            reference, reference_mask = self._embed(references)
            candidate, candidate_mask = self._embed(captions)
            score = bertscore(reference, reference_mask, candidate, candidate_mask)
        metadata = {"captions": captions, "references": references, "precision": score.precision.to(images.device),
                    "f1": score.f1.to(images.device)}
        return score.recall.to(images.device), metadata
