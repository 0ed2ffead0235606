"""A reward computed by a ``diffrl serve-reward`` server (:mod:`diffrl.rewards.server`).

Sends images in batches as JSON (base64 raw arrays, no pickle), with a timeout per
network operation and a bounded number of retries with exponential backoff for the
failures that can pass (connection refused or reset, timeouts, 429/502/503/504: :mod:`diffrl.rewards._http`). Every
failure raises :class:`RemoteRewardError` naming the URL and what to check, so a
trainer never hangs on a dead server.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any

import torch

from diffrl.rewards._http import JsonClient, ServiceError
from diffrl.rewards._wire import ENCODINGS, PROTOCOL, TOKEN_ENV, encode_images, jsonable
from diffrl.rewards.base import (ImageReward, PromptMetadata, Prompts, RewardError, RewardOutput, check_choice,
                                 check_positive)

__all__ = ["RemoteReward", "RemoteRewardError"]


class RemoteRewardError(ServiceError):
    """The reward server could not be reached, refused the request, or answered something unusable."""


class RemoteReward(ImageReward):
    """Call a reward hosted by ``diffrl serve-reward`` at ``url`` (e.g. ``http://127.0.0.1:8000``).

    Options: ``token`` (default ``$DIFFRL_REWARD_TOKEN``; never printed, logged or part of the repr),
    ``timeout`` (seconds per
    network operation), ``retries`` (extra attempts after the first), ``backoff``
    (seconds before the first retry, doubling), ``batch_size`` (images per request),
    ``encoding`` (``"uint8"``: 4x smaller, quantised like any saved image;
    ``"float32"``: exact). Proxies from the environment are not used. Per-image
    metadata lists from the batches are concatenated; other metadata values become a
    list with one entry per request.
    """

    name = "remote"
    differentiable = False

    def __init__(
        self,
        *,
        url: str,
        token: str | None = None,
        timeout: float = 120.0,
        retries: int = 2,
        backoff: float = 1.0,
        batch_size: int = 16,
        encoding: str = "uint8",
    ) -> None:
        parsed = urllib.parse.urlparse(url) if isinstance(url, str) else None
        if parsed is not None and "@" in parsed.netloc:  # user-info is a credential: never echo it
            shown = parsed._replace(netloc="***@" + parsed.netloc.rsplit("@", 1)[1]).geturl()
            raise RewardError(
                f"reward 'remote': option url={shown!r} holds a user name or password; the server takes a "
                f"token instead: give url=http://HOST:PORT and option token or ${TOKEN_ENV}"
            )
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise RewardError(f"reward 'remote': option url={url!r} must look like http://HOST:PORT")
        check_positive(timeout, reward=self.name, setting="timeout")
        check_positive(retries, reward=self.name, setting="retries", integer=True, allow_zero=True)
        check_positive(backoff, reward=self.name, setting="backoff", allow_zero=True)
        check_positive(batch_size, reward=self.name, setting="batch_size", integer=True)
        check_choice(encoding, ENCODINGS, reward=self.name, setting="encoding")
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.timeout, self.retries, self.backoff = float(timeout), retries, float(backoff)
        self.batch_size, self.encoding = batch_size, encoding
        self._client = JsonClient(
            self.url, token=self.token, timeout=timeout, retries=retries, backoff=backoff,
            service=f"reward server at {self.url}", error=RemoteRewardError,
            unreachable_hint=f"Check that `diffrl serve-reward` is running there and reachable, or raise option "
                             f"timeout={self.timeout:g}",
            auth_hint=lambda sent: (("the token does not match the server's" if sent else
                                     "no token was sent; set option token") + f" (or ${TOKEN_ENV})"),
            too_large_hint=f"lower option batch_size={self.batch_size}, use encoding='uint8', or raise the server's "
                           "--max-request-mb")

    def __repr__(self) -> str:  # never shows the token
        token = "set" if self.token else "none"
        return f"RemoteReward(url={self.url!r}, token={token}, encoding={self.encoding!r}, batch_size={self.batch_size})"

    def health(self) -> dict[str, Any]:
        """The server's ``GET /health`` answer (reward name, protocol, request limit)."""
        return self._client.request("GET", "/health")

    def score_images(self, images: torch.Tensor, prompts: Prompts, prompt_metadata: PromptMetadata) -> RewardOutput:
        prompts = list(prompts) if prompts is not None else None
        prompt_metadata = list(prompt_metadata) if prompt_metadata is not None else None
        for field, value in (("prompts", prompts), ("prompt_metadata", prompt_metadata)):
            if value is not None and len(value) != images.shape[0]:
                raise RewardError(f"reward 'remote' got {len(value)} {field} for {images.shape[0]} images")
        rewards: list[float] = []
        parts: list[tuple[int, dict[str, Any]]] = []
        for start in range(0, images.shape[0], self.batch_size):
            stop = min(start + self.batch_size, images.shape[0])
            body = {
                "protocol": PROTOCOL,
                "images": encode_images(images[start:stop], self.encoding),
                "prompts": prompts[start:stop] if prompts is not None else None,
                "prompt_metadata": jsonable(prompt_metadata[start:stop]) if prompt_metadata is not None else None,
            }
            answer = self._client.request("POST", "/reward", body)
            rewards += self._check_rewards(answer, stop - start)
            metadata = answer.get("metadata") or {}
            parts.append((stop - start, metadata if isinstance(metadata, dict) else {"value": metadata}))
        values = torch.tensor(rewards, dtype=torch.float32, device=images.device)
        return values, _merge(parts)

    def _check_rewards(self, answer: Any, expected: int) -> list[float]:
        values = answer.get("rewards") if isinstance(answer, dict) else None
        if (
            not isinstance(values, list)
            or len(values) != expected
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        ):
            raise RemoteRewardError(
                f"reward server at {self.url} answered garbage: expected 'rewards' as a list of {expected} numbers, "
                f"got {str(answer)[:200]!r}; is {self.url} a diffrl reward server?"
            )
        return [float(v) for v in values]


def _merge(parts: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Merge per-request metadata: per-image lists are concatenated, anything else listed per request."""
    if len(parts) == 1:
        return parts[0][1]
    merged: dict[str, Any] = {}
    for key in dict.fromkeys(k for _, metadata in parts for k in metadata):
        values = [(size, metadata.get(key)) for size, metadata in parts]
        if all(isinstance(v, list) and len(v) == size for size, v in values):
            merged[key] = [item for _, v in values for item in v]
        elif all(isinstance(v, dict) for _, v in values):
            merged[key] = _merge(values)
        else:
            merged[key] = [v for _, v in values]
    return merged
