"""A reward computed by a ``diffrl serve-reward`` server (:mod:`diffrl.rewards.server`).

Sends images in batches as JSON (base64 raw arrays, no pickle), with a timeout per
network operation and a bounded number of retries with exponential backoff for the
failures that can pass (connection refused or reset, timeouts, 502/503/504). Every
failure raises :class:`RemoteRewardError` naming the URL and what to check, so a
trainer never hangs on a dead server.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import torch

from diffrl.rewards._wire import ENCODINGS, PROTOCOL, TOKEN_ENV, encode_images, jsonable
from diffrl.rewards.base import (ImageReward, PromptMetadata, Prompts, RewardError, RewardOutput, check_choice,
                                 check_positive)

__all__ = ["RemoteReward", "RemoteRewardError"]

_RETRY_STATUS = (502, 503, 504)


class RemoteRewardError(RuntimeError):
    """The reward server could not be reached, refused the request, or answered something unusable."""


class _Retryable(Exception):
    """A failure worth another attempt; carries the message for the final error."""


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
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __repr__(self) -> str:  # never shows the token
        token = "set" if self.token else "none"
        return f"RemoteReward(url={self.url!r}, token={token}, encoding={self.encoding!r}, batch_size={self.batch_size})"

    def health(self) -> dict[str, Any]:
        """The server's ``GET /health`` answer (reward name, protocol, request limit)."""
        return self._request("GET", "/health", None)

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
            answer = self._request("POST", "/reward", json.dumps(body).encode("utf-8"))
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

    def _request(self, method: str, path: str, data: bytes | None) -> dict[str, Any]:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self._attempt(method, path, data)
            except _Retryable as error:
                last = str(error)
        raise RemoteRewardError(
            f"reward server at {self.url} failed {self.retries + 1} attempt(s): {last}. "
            f"Check that `diffrl serve-reward` is running there and reachable, or raise option timeout={self.timeout:g}"
        )

    def _attempt(self, method: str, path: str, data: bytes | None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            self._raise_for_status(error)
        except urllib.error.URLError as error:
            reason = error.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"no answer within timeout={self.timeout:g}s") from None
            raise _Retryable(f"cannot connect ({reason})") from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"no answer within timeout={self.timeout:g}s") from None
        except (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead) as error:
            raise _Retryable(f"connection dropped ({type(error).__name__}: {error})") from None
        except http.client.HTTPException as error:
            raise RemoteRewardError(
                f"reward server at {self.url} answered garbage, not HTTP ({type(error).__name__}: {error}); "
                "is the url right?"
            ) from None
        try:
            answer = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RemoteRewardError(
                f"reward server at {self.url} answered garbage, not JSON: {raw[:200]!r}; is the url right?"
            ) from None
        if not isinstance(answer, dict):
            raise RemoteRewardError(f"reward server at {self.url} answered garbage: {str(answer)[:200]!r}")
        return answer

    def _raise_for_status(self, error: urllib.error.HTTPError) -> None:
        try:
            message = json.loads(error.read()).get("error", "")
        except Exception:  # an error page that is not our JSON
            message = ""
        detail = f" ({message})" if message else ""
        if error.code in _RETRY_STATUS:
            raise _Retryable(f"HTTP {error.code}{detail}") from None
        if error.code in (401, 403):
            hint = "no token was sent; set option token" if not self.token else "the token does not match the server's"
            raise RemoteRewardError(
                f"reward server at {self.url} refused the request (HTTP {error.code}){detail}: {hint} "
                f"(or ${TOKEN_ENV})"
            ) from None
        if error.code == 413:
            raise RemoteRewardError(
                f"reward server at {self.url} refused the request as too large (HTTP 413){detail}; lower option "
                f"batch_size={self.batch_size}, use encoding='uint8', or raise the server's --max-request-mb"
            ) from None
        raise RemoteRewardError(f"reward server at {self.url} answered HTTP {error.code}{detail}") from None


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
