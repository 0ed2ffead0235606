"""The ``diffrl`` command: ``train``, ``serve-reward``, ``sample``, ``evaluate``, ``report``; ``--help`` and ``--version`` load no models."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from diffrl._version import __version__


def _train(args: argparse.Namespace) -> int:
    from diffrl.config import ConfigError

    config_path, overrides = None, list(args.overrides)
    if args.config is not None:
        if "=" in args.config and not os.path.exists(args.config):
            overrides.insert(0, args.config)
        else:
            config_path = args.config
    try:
        if config_path is None:
            from diffrl.recipes.quickstart import run_quickstart

            return run_quickstart(overrides)
        from diffrl.recipes.launch import train_from_config

        return train_from_config(config_path, overrides)
    except ConfigError as err:
        print(f"diffrl train: invalid configuration\n{err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffrl",
        description="Fine-tune diffusion models against reward functions with reinforcement learning "
        "(DDPO) and reward backpropagation (AlignProp, DRaFT, ReFL).",
    )
    parser.add_argument("--version", action="version", version=f"diffrl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser(
        "train", help="fine-tune a model (no config: the offline digits quickstart)",
        description="Train with a YAML config (presets in configs/) and field=value overrides. Without a config "
        "file, runs the offline quickstart: DDPO on the project's 8x8 digits DDPM to generate more of one digit. "
        "Unknown fields and wrong types are errors. Examples: `diffrl train`, `diffrl train reward=jpeg_compressibility`, "
        "`diffrl train trainer=alignprop`, `diffrl train configs/ddpo_aesthetic.yaml num_epochs=10`.",
    )
    train.add_argument("config", nargs="?", help="YAML config file (optional)")
    train.add_argument("overrides", nargs="*", help="field=value overrides, e.g. num_epochs=5 sample_batch_size=4")
    train.set_defaults(func=_train)
    try:
        from diffrl.rewards import server
    except ImportError:  # pragma: no cover - the server is part of the package
        server = None
    if server is not None:
        server.add_parser(sub)
    from diffrl.evaluate import cli as evaluate_cli

    evaluate_cli.add_sample_parser(sub)
    evaluate_cli.add_evaluate_parser(sub)
    evaluate_cli.add_report_parser(sub)
    return parser


class _TorchvisionFallbackFilter(logging.Filter):
    """transformers announces on import that its image processors fall back to Pillow without torchvision
    (there is no CPU build of torchvision on PyPI for every platform); diffrl never uses that path for
    training, so the notice is noise in the CLI. Other transformers warnings pass through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def main(argv: Sequence[str] | None = None) -> int:
    logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackFilter())
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
