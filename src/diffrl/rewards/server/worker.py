"""The reward server's model calls: one worker thread, one call at a time, optionally batched.

Reward models are not thread-safe and a GPU runs one call best at a time, so the event loop never calls the
reward itself: it queues each decoded request here and awaits the answer.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from diffrl.rewards._wire import RewardRequest, encode_response
from diffrl.rewards.base import Reward, reward_name

__all__ = ["Scorer"]

_STOP = object()


class Scorer:
    """Scores requests on one daemon thread, in arrival order, so reward calls never overlap.

    With ``max_batch_images > 1`` the requests already waiting when the thread frees up (same image size,
    same prompts/metadata presence, at most that many images in all) go to the reward as one call, and the
    answer is split back: rewards and per-image metadata (first dimension = all images) by request, other
    metadata values are copied to each. If the merged call fails, each request is scored on its own.
    """

    def __init__(self, reward: Reward, device: torch.device, max_batch_images: int = 0) -> None:
        self.reward, self.device, self.max_batch_images = reward, device, max_batch_images
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="diffrl-reward-worker", daemon=True)
        self._thread.start()

    async def run(self, request: RewardRequest) -> dict[str, Any]:
        """The encoded answer for ``request`` (raises what the reward raised)."""
        future: Future = Future()
        self._jobs.put((future, request))
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Let the worker thread finish the queued requests and stop."""
        self._jobs.put(_STOP)

    def _score(self, request: RewardRequest) -> tuple[list[float], Any]:
        name, count = reward_name(self.reward), request.images.shape[0]
        with torch.no_grad():
            rewards, metadata = self.reward(request.images.to(self.device), request.prompts, request.prompt_metadata)
        values = rewards.detach().float().cpu().reshape(-1).tolist()
        if len(values) != count:
            raise RuntimeError(f"reward '{name}' returned {len(values)} rewards for {count} images")
        if not all(math.isfinite(value) for value in values):
            raise RuntimeError(f"reward '{name}' returned non-finite rewards {values[:5]}")
        return values, metadata

    def _loop(self) -> None:
        waiting = None
        while (job := waiting or self._jobs.get()) is not _STOP:
            group, waiting = [job], None
            while self.max_batch_images > 1:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is _STOP or not _fits([request for _, request in group] + [job[1]], self.max_batch_images):
                    waiting = job
                    break
                group.append(job)
            group = [(future, request) for future, request in group if future.set_running_or_notify_cancel()]
            if len(group) > 1 and self._score_merged(group):
                continue
            for future, request in group:
                try:
                    future.set_result(encode_response(*self._score(request)))
                except BaseException as error:  # handed to the waiting request
                    future.set_exception(error)

    def _score_merged(self, group: list[tuple[Future, RewardRequest]]) -> bool:
        requests = [request for _, request in group]
        sizes = [request.images.shape[0] for request in requests]
        join = (lambda field: None if field[0] is None else [item for part in field for item in part])
        merged = RewardRequest(torch.cat([r.images for r in requests]), join([r.prompts for r in requests]),
                               join([r.prompt_metadata for r in requests]))
        try:
            values, metadata = self._score(merged)
        except Exception:  # score each alone, so each request gets its own answer or error
            return False
        offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        for i, ((future, _), part) in enumerate(zip(group, _split(metadata, offsets))):
            future.set_result(encode_response(values[offsets[i] : offsets[i + 1]], part))
        return True


def _fits(requests: list[RewardRequest], max_images: int) -> bool:
    first = requests[0]
    return sum(r.images.shape[0] for r in requests) <= max_images and all(
        r.images.shape[1:] == first.images.shape[1:]
        and (r.prompts is None) == (first.prompts is None)
        and (r.prompt_metadata is None) == (first.prompt_metadata is None)
        for r in requests
    )


def _split(value: Any, offsets: list[int]) -> list[Any]:
    """Metadata of a merged call -> one value per request: per-image sequences sliced, anything else copied."""
    count, total = len(offsets) - 1, offsets[-1]
    if isinstance(value, dict):
        columns = {key: _split(item, offsets) for key, item in value.items()}
        return [{key: column[i] for key, column in columns.items()} for i in range(count)]
    per_image = isinstance(value, (list, tuple)) or (isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim > 0)
    if per_image and len(value) == total:
        return [value[offsets[i] : offsets[i + 1]] for i in range(count)]
    return [value] * count
