"""The reward server's ASGI application: routes, token check, body limits and the access log.

``GET /health`` describes the server; ``POST /reward`` takes the wire format of :mod:`diffrl.rewards._wire`
and answers from the :class:`~diffrl.rewards.server.worker.Scorer`. Every error is ``{"error": message}`` with
a status the remote reward understands (400 bad request, 401/403 token, 408 stalled body, 413 too large,
500 the reward failed).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from diffrl.rewards._wire import PROTOCOL, WireError, decode_request
from diffrl.rewards.base import Reward, RewardError, reward_name
from diffrl.rewards.server.worker import Scorer

__all__ = ["AccessLog", "BodyStalled", "create_app", "read_body"]

logger = logging.getLogger(__package__)

_DRAIN_FACTOR = 4  # read and drop at most this many times the limit so a refused client still sees the answer


class AccessLog:
    """ASGI middleware: one log line per HTTP request; the query string and headers are never logged."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, state = time.perf_counter(), {"status": 0, "in": 0, "out": 0}

        async def counting_receive() -> dict:
            message = await receive()
            state["in"] += len(message.get("body", b""))
            return message

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            state["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            client = scope.get("client") or ("-", 0)
            logger.info(
                "%s:%s %s %s %d in=%dB out=%dB %.1fms", client[0], client[1], scope["method"], scope["path"],
                state["status"], state["in"], state["out"], 1000 * (time.perf_counter() - start),
            )


def _error(status: int, message: str, close: bool = False) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"Connection": "close"} if close else None)


class BodyStalled(Exception):
    """The client sent no part of its body for the body timeout."""


async def read_body(request: Request, limit: int, timeout: float) -> bytes | None:
    """The body, or None when it grows past ``limit``; raises :class:`BodyStalled` after ``timeout`` s of silence."""
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout)
        except StopAsyncIteration:
            return b"".join(chunks) if size <= limit else None
        except asyncio.TimeoutError:
            raise BodyStalled from None
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > _DRAIN_FACTOR * limit:
            return None


def _refusal(request: Request, token: str | None, max_request_bytes: int) -> JSONResponse | None:
    """The answer for a request refused on its headers alone (too large, no or wrong token), else None."""
    length = request.headers.get("content-length")
    announced = int(length) if length is not None and length.isdigit() else None
    if announced is not None and announced > max_request_bytes:
        return _error(413, f"request of {announced} bytes is over this server's limit of {max_request_bytes}", True)
    if token is None:
        return None
    header = request.headers.get("authorization", "")
    if not header.startswith("Bearer "):
        return _error(401, "this reward server needs a token: send 'Authorization: Bearer <token>'", True)
    if not hmac.compare_digest(header[len("Bearer "):].encode(), token.encode()):
        return _error(403, "wrong token for this reward server", close=True)
    return None


def create_app(reward: Reward, *, token: str | None, max_request_bytes: int, body_timeout: float,
               scorer: Scorer) -> AccessLog:
    """The ASGI application for ``reward`` (wrapped in the access log)."""
    app = FastAPI(title="diffrl reward server", docs_url=None, redoc_url=None, openapi_url=None)
    name = reward_name(reward)

    @app.exception_handler(HTTPException)
    async def _no_endpoint(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code in (404, 405):
            return _error(error.status_code, f"no endpoint {request.method} {request.url.path}; "
                          "use GET /health or POST /reward", close=True)
        return _error(error.status_code, str(error.detail))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok", "protocol": PROTOCOL, "reward": name, "differentiable": bool(reward.differentiable),
            "max_request_bytes": max_request_bytes, "token_required": token is not None,
            "max_batch_images": scorer.max_batch_images,
        }

    @app.post("/reward")
    async def post_reward(request: Request) -> JSONResponse:
        refusal = _refusal(request, token, max_request_bytes)
        try:  # read (or drain) the body even when refusing, so the client sees the answer, not a reset
            body = await read_body(request, max_request_bytes, body_timeout)
        except BodyStalled:
            if refusal is not None:  # e.g. a client that announced 10 GB and sends nothing
                return refusal
            return _error(408, f"the request body stalled for {body_timeout:g}s; connection closed", close=True)
        except ClientDisconnect:
            return _error(400, "the client disconnected mid-request", close=True)
        if refusal is not None:
            return refusal
        if body is None:
            return _error(413, f"request body is over this server's limit of {max_request_bytes} bytes", close=True)
        try:
            decoded = await run_in_threadpool(decode_request, body)
            return JSONResponse(await scorer.run(decoded))
        except (WireError, RewardError) as error:
            return _error(400, str(error))
        except Exception as error:  # the reward itself failed: report it to the client, keep serving
            logger.exception("reward '%s' failed", name)
            return _error(500, f"reward '{name}' failed: {type(error).__name__}: {error}")

    return AccessLog(app)
