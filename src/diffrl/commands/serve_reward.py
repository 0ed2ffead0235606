"""``diffrl serve-reward`` (also ``python -m diffrl.commands.serve_reward``): the command line of the reward server.

This module imports neither torch nor the server, so ``--help`` answers at once; the server
(:mod:`diffrl.rewards.server`, FastAPI + uvicorn + the reward) is imported when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from diffrl.config.overrides import KeyValueError, parse_key_value

__all__ = ["DEFAULTS", "DESCRIPTION", "add_parser", "configure", "main"]

DESCRIPTION = """\
Serve any registered reward over HTTP (FastAPI on uvicorn), so that a big reward model
lives on its own GPU or machine while the trainer calls it through the `remote` reward
(as the DDPO authors ran LLaVA beside their trainer). Needs: pip install 'diffrl[server]'.

Endpoints: GET /health and POST /reward (JSON, images as base64 raw arrays, never pickle).
It binds to 127.0.0.1 unless told otherwise. With a token (--token or $DIFFRL_REWARD_TOKEN)
POST /reward needs "Authorization: Bearer <token>" (401 without it, 403 when wrong).
The reward runs on one worker thread, one call at a time (--max-batch-images N merges
requests waiting at once). Requests over --max-request-mb get 413; a client that stalls
its headers or body for --body-timeout seconds is cut off (408). One log line per
request; headers and tokens are never logged.

example:
  diffrl serve-reward --reward alignment --option dtype=bfloat16 --host 0.0.0.0 --port 8000"""

DEFAULTS: dict[str, Any] = {"max_request_mb": 128.0, "body_timeout": 5.0, "max_connections": 512,
                            "max_batch_images": 0}
"""The server's limits as this command sets them by default; they equal the defaults of
:class:`diffrl.rewards.server.RewardServer` (a test keeps them so: this module may not import the server)."""

_SERVER_PACKAGES = ("fastapi", "starlette", "uvicorn", "h11")


def _option(text: str) -> tuple[str, Any]:
    """``--option key=value``, read like every other key=value of diffrl (YAML 1.2 values)."""
    try:
        return parse_key_value(text)
    except KeyValueError as error:
        raise argparse.ArgumentTypeError(f"--option {error}") from None


def _run(args: argparse.Namespace) -> int:
    try:
        # Imported here, not at the top, so that --help never loads torch or the web stack.
        from diffrl.rewards.server import serve_from_args
    except ModuleNotFoundError as error:
        if error.name not in _SERVER_PACKAGES:
            raise
        print(f"diffrl serve-reward: the reward server needs {error.name}, which is not installed; "
              "install the server extra: pip install 'diffrl[server]'", file=sys.stderr)
        return 2
    return serve_from_args(args)


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add serve-reward's arguments to ``parser``; it sets ``func``."""
    parser.add_argument("--reward", required=True, help="a registered reward name (e.g. aesthetic or alignment), an "
                        "installed package's, or your own as package.module:function")
    parser.add_argument("--option", action="append", default=[], type=_option, metavar="KEY=VALUE",
                        help="reward option, repeatable; values are YAML, as in train overrides "
                        "(e.g. classes=[6,7,8], differentiable=false, dtype=bfloat16)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    parser.add_argument("--token", default=None, help="shared secret clients must send (default: "
                        "$DIFFRL_REWARD_TOKEN; prefer the variable, a command-line token shows in the process list)")
    parser.add_argument("--max-request-mb", type=float, default=DEFAULTS["max_request_mb"],
                        help="refuse requests larger than this many MiB with 413 (default: %(default)g)")
    parser.add_argument("--body-timeout", type=float, default=DEFAULTS["body_timeout"],
                        help="seconds a client may stall its headers or body before it is cut off (default: %(default)g)")
    parser.add_argument("--max-connections", type=int, default=DEFAULTS["max_connections"],
                        help="connections served at once; more get 503 (default: %(default)d)")
    parser.add_argument("--max-batch-images", type=int, default=DEFAULTS["max_batch_images"],
                        help="merge requests waiting at once into one reward call of at most this many images "
                        "(default 0: one call per request)")
    parser.add_argument("--device", default=None, help="device the images are moved to (default: cuda if available)")
    parser.set_defaults(func=_run)
    return parser


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve-reward`` subcommand to an argparse ``subparsers`` object."""
    return configure(subparsers.add_parser("serve-reward", help="serve a registered reward over HTTP",
                                           description=DESCRIPTION,
                                           formatter_class=argparse.RawDescriptionHelpFormatter))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m diffrl.commands.serve_reward --reward NAME ...``"""
    parser = configure(argparse.ArgumentParser(prog="diffrl serve-reward", description=DESCRIPTION,
                                               formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
