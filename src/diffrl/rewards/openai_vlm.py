"""A vision-language judge behind an OpenAI-compatible chat API: how vLLM-, SGLang- or TGI-served VLMs (UnifiedReward,
Qwen-VL, ...) and hosted APIs are used as rewards.

Each image goes, as a PNG data URL, with a question (the prompt and its metadata filled in) to
``POST {url}/chat/completions``; the first number of the answer is the image's score, divided by ``max_score``.
Requests run ``concurrency`` at a time (the server batches them). An answer without a number is an error quoting
it, unless ``unparsed_score`` gives the score to use instead (counted in the metadata as ``unparsed``).
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffrl.rewards._http import JsonClient, ServiceError
from diffrl.rewards.base import ImageReward, PromptMetadata, Prompts, RewardError, RewardOutput, check_positive

__all__ = ["OpenAIVisionReward", "VisionJudgeError"]

API_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_QUESTION = ("How well does this image match the description \"{prompt}\", and how good is it as an image? "
                    "Answer with one number from 0 to 10 and nothing else.")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


class VisionJudgeError(ServiceError):
    """The judge could not be reached, refused the request, or gave an answer without a score."""


class OpenAIVisionReward(ImageReward):
    """``reward: openai_vlm`` with ``reward_options``: ``url`` (the API base, e.g. ``http://127.0.0.1:8000/v1``),
    ``model`` (the served model's name), ``api_key`` (default ``$OPENAI_API_KEY``; give it as ``${env:NAME}`` in
    configs: never written anywhere), ``question`` (a template with ``{prompt}`` and the prompt metadata's keys),
    ``max_score`` (10: scores are divided by it), ``max_tokens``, ``temperature`` (0: the same answer for the same
    image), ``concurrency``, ``timeout``, ``retries``, ``backoff``, ``unparsed_score``."""

    name = "openai_vlm"
    differentiable = False

    def __init__(self, *, url: str, model: str, api_key: str | None = None, question: str = DEFAULT_QUESTION,
                 max_score: float = 10.0, max_tokens: int = 16, temperature: float = 0.0, concurrency: int = 8,
                 timeout: float = 120.0, retries: int = 2, backoff: float = 1.0,
                 unparsed_score: float | None = None) -> None:
        parsed = urllib.parse.urlparse(url) if isinstance(url, str) else None
        if parsed is not None and "@" in parsed.netloc:  # user-info is a credential: never echo it
            shown = parsed._replace(netloc="***@" + parsed.netloc.rsplit("@", 1)[1]).geturl()
            raise RewardError(f"reward 'openai_vlm': option url={shown!r} holds a user name or password; give the "
                              "key as option api_key (or $OPENAI_API_KEY) and url=http://HOST:PORT/v1")
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise RewardError(f"reward 'openai_vlm': option url={url!r} must look like http://HOST:PORT/v1")
        if not isinstance(model, str) or not model:
            raise RewardError("reward 'openai_vlm': option model must name the served model, e.g. "
                              "model=Qwen/Qwen2.5-VL-7B-Instruct")
        if not isinstance(question, str) or "{" not in question:
            raise RewardError("reward 'openai_vlm': option question must be a template with {prompt} (and any prompt "
                              "metadata key in braces)")
        check_positive(max_score, reward=self.name, setting="max_score")
        check_positive(max_tokens, reward=self.name, setting="max_tokens", integer=True)
        check_positive(concurrency, reward=self.name, setting="concurrency", integer=True)
        check_positive(timeout, reward=self.name, setting="timeout")
        check_positive(retries, reward=self.name, setting="retries", integer=True, allow_zero=True)
        check_positive(backoff, reward=self.name, setting="backoff", allow_zero=True)
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise RewardError(f"reward 'openai_vlm': option temperature={temperature!r} must be a number >= 0")
        self.url, self.model, self.question = url.rstrip("/"), model, question
        self.max_score, self.max_tokens, self.temperature = float(max_score), max_tokens, float(temperature)
        self.concurrency, self.unparsed_score = concurrency, unparsed_score
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self._client = JsonClient(
            self.url, token=key, timeout=timeout, retries=retries, backoff=backoff,
            service=f"vision judge at {self.url}", error=VisionJudgeError,
            unreachable_hint="check that the server (vLLM, SGLang, ...) is running there and serves the model",
            auth_hint=lambda sent: "the API key was refused" if sent else f"no API key was sent; set option api_key "
                                                                          f"(or ${API_KEY_ENV})")

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIVisionReward(url={self.url!r}, model={self.model!r})"

    def score_images(self, images: torch.Tensor, prompts: Prompts, prompt_metadata: PromptMetadata) -> RewardOutput:
        n = images.shape[0]
        texts = list(prompts) if prompts is not None else [""] * n
        metas = list(prompt_metadata) if prompt_metadata is not None else [{}] * n
        pngs = [_png_data_url(image) for image in images]
        with ThreadPoolExecutor(min(self.concurrency, n)) as pool:
            answers = list(pool.map(self._ask, pngs, texts, metas))
        scores, unparsed = [], 0
        for answer in answers:
            value = _first_number(answer)
            if value is None:
                if self.unparsed_score is None:
                    raise VisionJudgeError(f"vision judge at {self.url} answered {answer[:200]!r}, which holds no "
                                           "number; ask for a number in option question, or give option "
                                           "unparsed_score to score such answers")
                value, unparsed = float(self.unparsed_score) * self.max_score, unparsed + 1
            scores.append(value / self.max_score)
        rewards = torch.tensor(scores, dtype=torch.float32, device=images.device)
        return rewards, {"answers": answers, "unparsed": unparsed}

    def _ask(self, png: str, prompt: str, metadata: Any) -> str:
        fields = dict(metadata) if isinstance(metadata, dict) else {}
        try:
            text = self.question.format(prompt=prompt, **{k: v for k, v in fields.items() if k != "prompt"})
        except (KeyError, IndexError) as err:
            raise RewardError(f"reward 'openai_vlm': option question names {err} , which the prompt metadata does "
                              f"not have (its keys: {sorted(fields)})") from None
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png}},
                                                          {"type": "text", "text": text}]}]}
        answer = self._client.request("POST", "/chat/completions", body)
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise VisionJudgeError(f"vision judge at {self.url} answered {str(answer)[:200]!r}, not a chat "
                                   "completion; is the url the API base (ending in /v1)?") from None
        if isinstance(content, list):  # content parts
            content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)


def _first_number(text: str) -> float | None:
    match = _NUMBER.search(text)
    if match is None:
        return None
    value = float(match.group())
    return value if math.isfinite(value) else None


def _png_data_url(image: torch.Tensor) -> str:
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
