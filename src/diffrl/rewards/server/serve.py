"""Binding and running the reward server: :class:`RewardServer` (uvicorn on a socket bound up front),
:func:`make_server`, :func:`run_server` and :func:`serve_from_args` (what ``diffrl serve-reward`` runs)."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import socket
import sys
import threading
import time
from typing import Any

import torch
import uvicorn

from diffrl.rewards import load
from diffrl.rewards._wire import TOKEN_ENV
from diffrl.rewards.base import Reward, RewardError, reward_name
from diffrl.rewards.server.app import create_app
from diffrl.rewards.server.protocol import header_deadline_protocol
from diffrl.rewards.server.worker import Scorer

__all__ = [
    "BACKLOG",
    "DEFAULT_BODY_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_REQUEST_BYTES",
    "RewardServer",
    "ServerStartError",
    "make_server",
    "run_server",
    "serve_from_args",
]

logger = logging.getLogger(__package__)

DEFAULT_MAX_REQUEST_BYTES = 128 * 1024 * 1024
"""Requests larger than this get 413 (128 MiB: 256 images of 512x512 in uint8, 64 in float32)."""
DEFAULT_BODY_TIMEOUT = 5.0
"""Seconds a client may leave its request line, headers or body unsent before it is cut off."""
DEFAULT_MAX_CONNECTIONS = 512
"""Connections served at once; beyond this uvicorn answers 503, which the remote reward retries."""
BACKLOG = 2048
"""Listen backlog: connections the kernel queues before the event loop accepts them."""


class ServerStartError(RuntimeError):
    """The server cannot start (port in use, bad address, bad setting); the message says the fix."""


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


def _check_settings(max_request_bytes: Any, max_connections: Any, max_batch_images: Any, body_timeout: Any) -> None:
    for setting, value, low in (("max_request_bytes", max_request_bytes, 1), ("max_connections", max_connections, 1),
                                ("max_batch_images", max_batch_images, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ServerStartError(f"{setting}={value!r} must be an integer >= {low}")
    if isinstance(body_timeout, bool) or not isinstance(body_timeout, (int, float)) or body_timeout <= 0:
        raise ServerStartError(f"body_timeout={body_timeout!r} must be a positive number of seconds")


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
        _check_settings(max_request_bytes, max_connections, max_batch_images, body_timeout)
        self.reward, self.token, self.max_request_bytes = reward, token or None, max_request_bytes
        self.device = torch.device(device) if device is not None else _default_device()
        self._scorer = Scorer(reward, self.device, max_batch_images)
        app = create_app(reward, token=self.token, max_request_bytes=max_request_bytes,
                         body_timeout=float(body_timeout), scorer=self._scorer)
        self.socket = _bind(host, port)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                http=header_deadline_protocol(body_timeout), limit_concurrency=max_connections,
                                timeout_keep_alive=5, timeout_graceful_shutdown=5, server_header=False)
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


def _serve(server: RewardServer) -> None:
    """Announce ``server`` (the first stdout line gives its URL) and serve until Ctrl-C; then close it."""
    name = reward_name(server.reward)
    logger.info("serving reward '%s' at %s (device %s)", name, server.url, server.device)
    print(f"serving reward '{name}' at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def run_server(reward: Reward | str, host: str = "127.0.0.1", port: int = 8000, **settings: Any) -> None:
    """Serve ``reward`` until interrupted (Ctrl-C)."""
    _serve(make_server(reward, host, port, **settings))


def serve_from_args(args: argparse.Namespace) -> int:
    """Run ``diffrl serve-reward`` with its parsed arguments (:mod:`diffrl.commands.serve_reward`): build the reward
    (cheap: models load on the first request), bind, serve; a user error is one line on stderr and exit status 2.

    Logs (one line per request) go to stderr at INFO unless the caller configured logging.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        server = make_server(
            load(args.reward, **dict(args.option)), args.host, args.port,
            token=args.token or os.environ.get(TOKEN_ENV) or None,
            max_request_bytes=max(1, int(args.max_request_mb * 2**20)), body_timeout=args.body_timeout,
            max_connections=args.max_connections, max_batch_images=args.max_batch_images, device=args.device,
        )
    except (RewardError, ServerStartError) as error:
        print(f"diffrl serve-reward: {error}", file=sys.stderr)
        return 2
    _serve(server)
    return 0
