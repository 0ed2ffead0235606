"""Prompt-image alignment, the DDPO paper's VLM reward (Black et al. 2023, sec. 6.3).

A vision-language model answers "what is going on in this image?"; the reward is the
BERTScore recall (Zhang et al. 2020, "BERTScore: Evaluating Text Generation with BERT",
eq. for R_BERT) of its answer against the reference "The image contains {prompt}":
each reference token is matched greedily to its most similar answer token by cosine
similarity of contextual embeddings, and the similarities are averaged over the
reference tokens. The paper used LLaVA served on separate GPUs; any transformers
image-text-to-text model with a chat template works here, and ``diffrl serve-reward``
can host it on another machine (:mod:`diffrl.rewards.server`).

The defaults follow the ``bert_score`` package's English setting (``roberta-large``,
layer 17, no idf weighting, no baseline rescaling). Not differentiable.
"""

from __future__ import annotations

from typing import Any

import torch

from diffrl.rewards._loading import ModelReward, freeze, from_pretrained, place
from diffrl.rewards.base import PromptMetadata, Prompts, RewardError, RewardOutput, check_positive
from diffrl.rewards.preprocess import to_uint8_arrays

__all__ = ["AlignmentReward", "bertscore_recall"]

FALLBACK_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
"""LLaVA-1.5's prompt format, used when the processor has no chat template."""


def bertscore_recall(
    reference: torch.Tensor, reference_mask: torch.Tensor, candidate: torch.Tensor, candidate_mask: torch.Tensor
) -> torch.Tensor:
    """BERTScore recall per pair (Zhang et al. 2020, sec. 3): ``mean_i max_j cos(ref_i, cand_j)``.

    ``reference`` ``[B, Lr, D]`` and ``candidate`` ``[B, Lc, D]`` are token embeddings;
    the boolean masks ``[B, Lr]``, ``[B, Lc]`` mark the tokens that count (not padding,
    not special tokens). A candidate without tokens has recall 0.
    """
    reference = reference.float() / torch.linalg.vector_norm(reference.float(), dim=-1, keepdim=True)
    candidate = candidate.float() / torch.linalg.vector_norm(candidate.float(), dim=-1, keepdim=True)
    similarity = reference @ candidate.transpose(1, 2)  # [B, Lr, Lc]
    similarity = similarity.masked_fill(~candidate_mask[:, None, :], float("-inf"))
    best = similarity.max(dim=-1).values  # greedy match of each reference token
    best = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
    mask = reference_mask.float()
    return (best * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


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
    ``question``, ``reference`` (a format string with ``{prompt}``), ``max_new_tokens``,
    ``batch_size`` (images per VLM call). Metadata holds the captions and references.
    """

    name = "alignment"
    differentiable = False
    needs_prompts = True

    def __init__(
        self,
        *,
        vlm: str = "llava-hf/llava-1.5-7b-hf",
        bert: str = "roberta-large",
        bert_layer: int | None = 17,
        question: str = "what is going on in this image?",
        reference: str = "The image contains {prompt}",
        max_new_tokens: int = 64,
        batch_size: int = 8,
        device: str | None = None,
        dtype: str | None = None,
    ) -> None:
        check_positive(max_new_tokens, reward=self.name, setting="max_new_tokens", integer=True)
        check_positive(batch_size, reward=self.name, setting="batch_size", integer=True)
        if bert_layer is not None:
            check_positive(bert_layer, reward=self.name, setting="bert_layer", integer=True)
        if "{prompt}" not in reference:
            raise RewardError(f"reward 'alignment': option reference={reference!r} must contain '{{prompt}}'")
        self.vlm, self.bert, self.bert_layer = vlm, bert, bert_layer
        self.question, self.reference = question, reference
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
            chunk = to_uint8_arrays(images[start : start + self.batch_size])
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
            recall = bertscore_recall(reference, reference_mask, candidate, candidate_mask)
        return recall.to(images.device), {"captions": captions, "references": references}
