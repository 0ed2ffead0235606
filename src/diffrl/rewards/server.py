"""Serve any registered reward over HTTP (FastAPI on uvicorn): diffrl serve-reward --reward NAME ...

The DDPO authors ran LLaVA as a separate HTTP server on two of their eight GPUs
(ddpo-pytorch with the LLaVA-server repository); this lets a big reward model live on
its own GPU or machine while the trainer calls it through the `remote` reward.

Endpoints: GET /health (reward name, protocol, request limit) and POST /reward (JSON,
images as base64 raw arrays, never pickle; see diffrl/rewards/_wire.py). It binds to
127.0.0.1 unless told otherwise. With a token (--token or $DIFFRL_REWARD_TOKEN) POST
/reward needs "Authorization: Bearer <token>" (401 without it, 403 when wrong).
Connections are handled concurrently by one event loop; the reward itself runs on one
worker thread, one call at a time, in arrival order (reward models are not thread-safe);
--max-batch-images N merges requests that wait at the same time into one call.
Requests over the size limit get 413; a client that stops sending its body for
--body-timeout seconds gets 408 and is disconnected, and one that has not finished its
headers by then is disconnected. One log line per request (client, method, path,
status, bytes in/out, latency); headers and tokens are never logged.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hmac
import ipaddress
import logging
import math
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import h11
import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from diffrl.config.overrides import KeyValueError, parse_key_value
from diffrl.rewards import load
from diffrl.rewards._wire import PROTOCOL, TOKEN_ENV, RewardRequest, WireError, decode_request, encode_response
from diffrl.rewards.base import Reward, RewardError, reward_name

__all__ = [
    "RewardServer",
    "ServerStartError",
    "add_parser",
    "make_server",
    "run_server",
    "main",
    "DEFAULT_MAX_REQUEST_BYTES",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 128 * 1024 * 1024
DEFAULT_BODY_TIMEOUT = 5.0
"""Seconds a client may leave its request body unsent (between two chunks) before it is cut off."""
DEFAULT_MAX_CONNECTIONS = 512
"""Connections served at once; beyond this uvicorn answers 503, which the remote reward retries."""
BACKLOG = 2048
"""Listen backlog: connections the kernel queues before the event loop accepts them."""
_DRAIN_FACTOR = 4  # read and drop at most this many times the limit so a refused client still sees the answer


class ServerStartError(RuntimeError):
    """The server cannot start (port in use, bad address, bad setting); the message says the fix."""


_STOP = object()


class _Scorer:
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


class _AccessLog:
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


class _Stalled(Exception):
    pass


async def _read_body(request: Request, limit: int, timeout: float) -> bytes | None:
    """The body, or None when it grows past ``limit``; raises :class:`_Stalled` after ``timeout`` s of silence."""
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout)
        except StopAsyncIteration:
            return b"".join(chunks) if size <= limit else None
        except asyncio.TimeoutError:
            raise _Stalled from None
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > _DRAIN_FACTOR * limit:
            return None


def create_app(
    reward: Reward, *, token: str | None, max_request_bytes: int, body_timeout: float, scorer: _Scorer,
) -> Any:
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
        length = request.headers.get("content-length")
        announced = int(length) if length is not None and length.isdigit() else None
        refusal: JSONResponse | None = None
        if announced is not None and announced > max_request_bytes:
            refusal = _error(413, f"request of {announced} bytes is over this server's limit of {max_request_bytes}",
                             close=True)
        elif token is not None:
            header = request.headers.get("authorization", "")
            if not header.startswith("Bearer "):
                refusal = _error(401, "this reward server needs a token: send 'Authorization: Bearer <token>'", True)
            elif not hmac.compare_digest(header[len("Bearer "):].encode(), token.encode()):
                refusal = _error(403, "wrong token for this reward server", close=True)
        try:
            body = await _read_body(request, max_request_bytes, body_timeout)
        except _Stalled:
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

    return _AccessLog(app)


class _HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's line and headers.

    uvicorn times out idle keep-alive connections but not a client that connects and sends
    nothing, or half its headers (slowloris); such a connection is closed after
    ``header_timeout`` seconds. Body stalls are the app's (:func:`_read_body`).
    """

    header_timeout = DEFAULT_BODY_TIMEOUT
    _deadline: asyncio.TimerHandle | None = None
    _answered = 0

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.header_timeout, self._headers_overdue)

    def _headers_overdue(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            partial = bool(self.conn.trailing_data[0])
            (logger.info if partial or not self._answered else logger.debug)(
                "%s:%s sent no complete request within %gs; connection closed", *(self.client or ("-", 0)),
                self.header_timeout,
            )
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        self._answered += 1
        super().on_response_complete()
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or :class:`ServerStartError` saying what to change."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=BACKLOG)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise ServerStartError(
                f"port {port} on {host} is already in use (another serve-reward?); "
                "pass a free --port (0 picks one) or stop the process using it"
            ) from None
        raise ServerStartError(f"cannot listen on {host}:{port} ({error.strerror or error}); check --host/--port") from None


class RewardServer:
    """One reward behind FastAPI + uvicorn; binds on construction, serves on :meth:`serve_forever` or :meth:`start`.

    Use as a context manager to serve from a background thread: ``with make_server(r) as server: server.url``.
    """

    def __init__(
        self,
        reward: Reward,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_batch_images: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        for setting, value, low in (("max_request_bytes", max_request_bytes, 1),
                                    ("max_connections", max_connections, 1), ("max_batch_images", max_batch_images, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ServerStartError(f"{setting}={value!r} must be an integer >= {low}")
        if not isinstance(body_timeout, (int, float)) or body_timeout <= 0:
            raise ServerStartError(f"body_timeout={body_timeout!r} must be a positive number of seconds")
        self.reward, self.token, self.max_request_bytes = reward, token or None, max_request_bytes
        self.device = torch.device(device) if device is not None else _default_device()
        self._scorer = _Scorer(reward, self.device, max_batch_images)
        app = create_app(reward, token=self.token, max_request_bytes=max_request_bytes,
                         body_timeout=float(body_timeout), scorer=self._scorer)
        self.socket = _bind(host, port)
        protocol = type("_Protocol", (_HeaderDeadline,), {"header_timeout": float(body_timeout)})
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", http=protocol,
                                limit_concurrency=max_connections, timeout_keep_alive=5, timeout_graceful_shutdown=5,
                                server_header=False)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def server_address(self) -> tuple[str, int]:
        return self.socket.getsockname()[:2]

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (Ctrl-C) or :meth:`shutdown`."""
        self._server.run(sockets=[self.socket])

    def start(self, timeout: float = 10.0) -> str:
        """Serve from a daemon thread; returns the URL once the server accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, name="diffrl-reward-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ServerStartError(f"the reward server at {self.url} did not start within {timeout:g}s")
            time.sleep(0.01)
        return self.url

    def shutdown(self) -> None:
        """Stop serving (in-flight requests get up to 5 s to finish) and wait for the server thread."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def server_close(self) -> None:
        self._scorer.close()
        self.socket.close()

    def __enter__(self) -> RewardServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(reward: Reward | str, host: str = "127.0.0.1", port: int = 0, **settings: Any) -> RewardServer:
    """Bind a :class:`RewardServer` (port 0 picks a free one; see ``.url``) without serving yet.

    ``settings``: ``token``, ``max_request_bytes``, ``body_timeout``, ``max_connections``, ``max_batch_images``,
    ``device``.
    """
    if isinstance(reward, str):
        reward = load(reward)
    if not _is_loopback(host):
        if not settings.get("token"):
            logger.warning(
                "serving reward '%s' on %s without a token: anyone who can reach it can use it", reward_name(reward), host
            )
        logger.warning("the reward server speaks plain HTTP; use TLS or an SSH tunnel outside a trusted network")
    return RewardServer(reward, host, port, **settings)


def run_server(reward: Reward | str, host: str = "127.0.0.1", port: int = 8000, **settings: Any) -> None:
    """Serve ``reward`` until interrupted (Ctrl-C)."""
    server = make_server(reward, host, port, **settings)
    logger.info("serving reward '%s' at %s (device %s)", reward_name(server.reward), server.url, server.device)
    print(f"serving reward '{reward_name(server.reward)}' at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _option(text: str) -> tuple[str, Any]:
    """``--option key=value`` with the project's one key=value reading (YAML 1.2 values)."""
    try:
        return parse_key_value(text)
    except KeyValueError as error:
        raise argparse.ArgumentTypeError(f"--option {error}") from None


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--reward", required=True, help="registered reward name, e.g. aesthetic or alignment")
    parser.add_argument(
        "--option", action="append", default=[], type=_option, metavar="KEY=VALUE",
        help="reward option, repeatable; values are read as YAML (e.g. classes=[6,7,8], differentiable=false)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    parser.add_argument("--token", default=None,
                        help=f"shared secret clients must send (default: ${TOKEN_ENV}; prefer the variable, "
                        "a command-line token is visible to other users in the process list)")
    parser.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_BYTES / 2**20,
                        help="refuse requests larger than this many MiB with 413 (default: %(default)g)")
    parser.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT,
                        help="seconds a client may stall mid-body before it gets 408 (default: %(default)g)")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="connections served at once; more get 503 (default: %(default)d)")
    parser.add_argument("--max-batch-images", type=int, default=0,
                        help="merge requests waiting at once into one reward call of at most this many images "
                        "(default 0: one call per request)")
    parser.add_argument("--device", default=None, help="device the images are moved to (default: cuda if available)")
    parser.set_defaults(func=serve_from_args)
    return parser


def serve_from_args(args: argparse.Namespace) -> int:
    """Build the reward (cheap: models load on the first request), bind, serve; user errors exit 2 in one line.

    Logs (one line per request) go to stderr at INFO unless the caller configured logging.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        reward = load(args.reward, **dict(args.option))
        server = make_server(
            reward, args.host, args.port, token=args.token or os.environ.get(TOKEN_ENV) or None,
            max_request_bytes=max(1, int(args.max_request_mb * 2**20)), body_timeout=args.body_timeout,
            max_connections=args.max_connections, max_batch_images=args.max_batch_images, device=args.device,
        )
    except (RewardError, ServerStartError) as error:
        print(f"diffrl serve-reward: {error}", file=sys.stderr)
        return 2
    logger.info("serving reward '%s' at %s (device %s)", reward_name(reward), server.url, server.device)
    print(f"serving reward '{reward_name(reward)}' at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


_DESCRIPTION = __doc__.split("\n\n", 1)[1]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve-reward`` subcommand to an argparse ``subparsers`` object; it sets ``func``."""
    parser = subparsers.add_parser("serve-reward", help="serve a registered reward over HTTP", description=_DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    return _configure(parser)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m diffrl.rewards.server --reward NAME ...``"""
    parser = _configure(argparse.ArgumentParser(prog="diffrl serve-reward", description=_DESCRIPTION,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
