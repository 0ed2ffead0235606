"""The ``diffrl`` command: ``diffrl --help``, ``diffrl --version`` and the subcommands."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from diffrl._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffrl",
        description="Fine-tune diffusion models against reward functions with reinforcement learning "
        "(DDPO) and reward backpropagation (AlignProp, DRaFT, ReFL).",
    )
    parser.add_argument("--version", action="version", version=f"diffrl {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
