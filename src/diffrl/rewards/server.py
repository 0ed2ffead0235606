"""Serve any registered reward over HTTP: ``diffrl serve-reward --reward NAME ...``.

The DDPO authors ran LLaVA as a separate HTTP server on two of their eight GPUs
(ddpo-pytorch with the LLaVA-server repository); this lets a big reward model live on
its own GPU or machine while the trainer calls it through the ``remote`` reward
(:mod:`diffrl.rewards.remote`). Standard library only (``http.server``).

Endpoints: ``GET /health`` (reward name, protocol, request limit) and ``POST /reward``
(the JSON format in :mod:`diffrl.rewards._wire`). It binds to 127.0.0.1 unless told
otherwise; with a token (``--token`` or ``$DIFFRL_REWARD_TOKEN``) ``/reward`` requires
``Authorization: Bearer <token>`` (401 without it, 403 when wrong). Requests larger than
``max_request_bytes`` are refused with 413 before they are read into memory.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import os
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from diffrl.rewards._wire import PROTOCOL, TOKEN_ENV, WireError, decode_images, jsonable
from diffrl.rewards.base import Reward, RewardError, reward_name

__all__ = ["RewardServer", "add_parser", "make_server", "run_server", "main", "DEFAULT_MAX_REQUEST_BYTES"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 128 * 1024 * 1024
_DRAIN_FACTOR = 4  # read and drop at most this many times the limit so the client sees the 413


class RewardServer(ThreadingHTTPServer):
    """An HTTP server around one reward; requests are scored one at a time (the model is shared)."""

    daemon_threads = True

    def __init__(
        self,
        reward: Reward,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        device: str | torch.device | None = None,
    ) -> None:
        if not isinstance(max_request_bytes, int) or max_request_bytes <= 0:
            raise ValueError(f"max_request_bytes={max_request_bytes!r} must be a positive integer")
        self.reward = reward
        self.token = token or None
        self.max_request_bytes = max_request_bytes
        self.device = torch.device(device) if device is not None else _default_device()
        self.lock = threading.Lock()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"

    def score(self, request: Any) -> dict[str, Any]:
        """Decode a request, run the reward, encode the answer (raises WireError/RewardError on bad input)."""
        if not isinstance(request, dict):
            raise WireError("the request body must be a JSON object")
        if request.get("protocol", PROTOCOL) != PROTOCOL:
            raise WireError(f"protocol {request.get('protocol')!r} is not supported (this server speaks {PROTOCOL})")
        images = decode_images(request.get("images"))
        prompts, metadata = request.get("prompts"), request.get("prompt_metadata")
        for field, value in (("prompts", prompts), ("prompt_metadata", metadata)):
            if value is not None and (not isinstance(value, list) or len(value) != images.shape[0]):
                raise WireError(f"'{field}' must be null or a list with one entry per image ({images.shape[0]})")
        with self.lock, torch.no_grad():
            rewards, reward_metadata = self.reward(images.to(self.device), prompts, metadata)
        values = rewards.detach().float().cpu().reshape(-1).tolist()
        if len(values) != images.shape[0]:
            raise RuntimeError(
                f"reward '{reward_name(self.reward)}' returned {len(values)} rewards for {images.shape[0]} images"
            )
        return {"protocol": PROTOCOL, "rewards": values, "metadata": jsonable(reward_metadata)}


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    timeout = 120  # seconds a client may stall mid-request before its connection is dropped
    server_version = "diffrl-reward"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        logger.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: dict[str, Any], close: bool = False) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout); nothing to do
            logger.info("client %s left before the answer (status %d)", self.address_string(), status)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") != "/health":
            self._send(404, {"error": f"no endpoint GET {self.path}; use GET /health or POST /reward"})
            return
        reward = self.server.reward
        self._send(
            200,
            {
                "status": "ok",
                "protocol": PROTOCOL,
                "reward": reward_name(reward),
                "differentiable": bool(reward.differentiable),
                "max_request_bytes": self.server.max_request_bytes,
                "token_required": self.server.token is not None,
            },
        )

    def _authorized(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        header = self.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            message = "this reward server needs a token: send 'Authorization: Bearer <token>'"
            self._send(401, {"error": message}, close=True)
            return False
        if not hmac.compare_digest(header[len("Bearer ") :].encode(), token.encode()):
            self._send(403, {"error": "wrong token for this reward server"}, close=True)
            return False
        return True

    def _drain(self, length: int) -> None:
        remaining = min(length, _DRAIN_FACTOR * self.server.max_request_bytes)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                break
            remaining -= len(chunk)

    def do_POST(self) -> None:  # noqa: N802
        length_header = self.headers.get("Content-Length")
        try:
            length = int(length_header) if length_header is not None else -1
        except ValueError:
            length = -1
        if self.path.rstrip("/") != "/reward":
            self._drain(max(length, 0))
            self._send(404, {"error": f"no endpoint POST {self.path}; use POST /reward"}, close=True)
            return
        if length < 0:
            self._send(411, {"error": "POST /reward needs a Content-Length header"}, close=True)
            return
        limit = self.server.max_request_bytes
        if length > limit:
            self._drain(length)
            self._send(413, {"error": f"request of {length} bytes is over this server's limit of {limit}"}, close=True)
            return
        if not self._authorized():
            self._drain(length)
            return
        try:
            request = json.loads(self.rfile.read(length))
            answer = self.server.score(request)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            self._send(400, {"error": f"the request body is not JSON ({error})"})
        except (WireError, RewardError) as error:
            self._send(400, {"error": str(error)})
        except Exception as error:  # the reward itself failed: report it to the client, keep serving
            logger.exception("reward '%s' failed", reward_name(self.server.reward))
            self._send(500, {"error": f"reward '{reward_name(self.server.reward)}' failed: {type(error).__name__}: {error}"})
        else:
            self._send(200, answer)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(
    reward: Reward | str,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    token: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    device: str | torch.device | None = None,
) -> RewardServer:
    """Bind a :class:`RewardServer` (port 0 picks a free one; see ``.url``) without starting it."""
    if isinstance(reward, str):
        from diffrl.rewards import load

        reward = load(reward)
    if not _is_loopback(host):
        if token is None:
            logger.warning(
                "serving reward '%s' on %s without a token: anyone who can reach it can use it", reward_name(reward), host
            )
        logger.warning("the reward server speaks plain HTTP; use TLS or an SSH tunnel outside a trusted network")
    return RewardServer(reward, host, port, token=token, max_request_bytes=max_request_bytes, device=device)


def run_server(
    reward: Reward | str,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    device: str | torch.device | None = None,
) -> None:
    """Serve ``reward`` until interrupted (Ctrl-C)."""
    server = make_server(reward, host, port, token=token, max_request_bytes=max_request_bytes, device=device)
    logger.info("serving reward '%s' at %s (device %s)", reward_name(server.reward), server.url, server.device)
    print(f"serving reward '{reward_name(server.reward)}' at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` -> ``(key, value)``, the value read as JSON when it parses (numbers, lists, true/false, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option {text!r} must look like key=value")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--reward", required=True, help="registered reward name (see diffrl.rewards.available())")
    parser.add_argument(
        "--option", action="append", default=[], type=parse_option, metavar="KEY=VALUE",
        help="reward option, repeatable; values are read as JSON when they parse (e.g. classes=[6,7,8])",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    parser.add_argument("--token", default=None, help=f"shared secret clients must send (default: ${TOKEN_ENV})")
    parser.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_BYTES / 2**20,
                        help="refuse requests larger than this many MiB (413)")
    parser.add_argument("--device", default=None, help="device the images are moved to (default: cuda if available)")
    parser.set_defaults(func=_serve)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from diffrl.rewards import load

    options = dict(args.option)
    reward = load(args.reward, **options)
    token = args.token or os.environ.get(TOKEN_ENV) or None
    limit = int(args.max_request_mb * 2**20)
    run_server(reward, args.host, args.port, token=token, max_request_bytes=limit, device=args.device)
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve-reward`` subcommand to an argparse ``subparsers`` object; it sets ``func``."""
    parser = subparsers.add_parser("serve-reward", help="serve a registered reward over HTTP", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    return _configure(parser)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m diffrl.rewards.server --reward NAME ...``"""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = _configure(argparse.ArgumentParser(prog="diffrl serve-reward", description=__doc__,
                                                formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
