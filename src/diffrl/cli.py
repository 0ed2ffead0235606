"""The ``diffrl`` command: ``train``, ``serve-reward``, ``sample``, ``evaluate``, ``report``.

``diffrl --help`` and every subcommand's ``--help`` import neither torch nor diffusers: the
subcommands other than ``train`` are listed from :data:`COMMANDS` and their parsers are built
only when they run (from the module that owns them). ``diffrl train`` reads its config with
:mod:`diffrl.config` (light) and reports every configuration mistake in one line per problem
with exit status 2; ``--debug`` shows tracebacks instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import NamedTuple

from diffrl._version import __version__
from diffrl.config import ConfigError, KeyValueError, from_cli_args, load_config, read_config_file, registry, \
    trainer_from_overrides
from diffrl.config.overrides import is_key_value
from diffrl.presets import quickstart_preset

__all__ = ["COMMANDS", "build_parser", "main"]

USAGE_ERROR = 2


class Command(NamedTuple):
    """A subcommand whose parser lives in another module: ``module:function(subparsers)`` adds it."""

    module: str
    add_parser: str
    help: str


COMMANDS: dict[str, Command] = {
    "serve-reward": Command("diffrl.commands.serve_reward", "add_parser", "serve a registered reward over HTTP"),
    "sample": Command("diffrl.evaluate.cli", "add_sample_parser",
                      "generate images from a base model or a fine-tuned result"),
    "evaluate": Command("diffrl.evaluate.cli", "add_evaluate_parser",
                        "compare a base model and fine-tuned results on the same noise"),
    "report": Command("diffrl.evaluate.cli", "add_report_parser", "write a self-contained HTML report for a run"),
    "export": Command("diffrl.commands.export", "add_parser",
                      "write a result or checkpoint for diffusers, ComfyUI or AUTOMATIC1111"),
}

TRAIN_HELP = """Train with a YAML config (presets in configs/) and overrides. Without a config file: with model=... the
trainer's defaults and the overrides; without a model, the offline quickstart: DDPO on the project's 8x8 digits DDPM
to generate more of one digit.

Overrides take any of the forms TRL's scripts (HfArgumentParser) and diffrl accept:
  field=value   --field=value   --field value   --field v1 v2 (a list)   --flag   --no_flag
Values are YAML 1.2 (4, 1e-4, true, null, [0, 10]; `no` stays a string). trainer=NAME or algorithm=NAME
picks the trainer ({trainers}). Unknown fields and wrong types are errors.

examples:
  diffrl train
  diffrl train reward=jpeg_compressibility
  diffrl train trainer=alignprop
  diffrl train configs/ddpo_aesthetic.yaml --num_epochs 10 --log_with mlflow
  diffrl train configs/alignprop_aesthetic.yaml --sample_num_steps 20 --truncated_rand_backprop_minmax 0 20
"""


def _train_help(chosen: str | None = None) -> str:
    """The train help with the fields of the chosen trainer only, or of every trainer when none is chosen."""
    trainers = ", ".join(f"{name}: {', '.join(spec.algorithms)}" for name, spec in registry.TRAINERS.items())
    sections = [TRAIN_HELP.format(trainers=trainers)]
    for name in [chosen] if chosen else registry.TRAINERS:
        sections.append(f"trainer={name}: " + registry.config_class(name).help_text())
    if chosen is None:
        sections.append("(trainer=NAME --help, or a config file and --help, lists one trainer's fields only)")
    return "\n\n".join(sections)


def _chosen_trainer(words: list[str]) -> str | None:
    """The trainer that ``trainer=``/``algorithm=`` words or the config file name; None when they name none (or
    cannot be read: the help is printed all the same)."""
    try:
        path, overrides = _split_train_args(words)
        spec = trainer_from_overrides(overrides)
        if spec is None and path is not None:
            chosen, _, _ = registry.select({k: v for k, v in read_config_file(path).items()
                                            if k in registry.SELECTOR_KEYS})
            spec = chosen
    except (ConfigError, KeyValueError):
        return None
    return spec.name if spec else None


def _split_train_args(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """The config file (the first word that is neither an option nor ``field=value``, or an existing path)
    and the overrides in ``field=value`` form."""
    args = list(args)
    path = None
    if args and not args[0].startswith("--") and (os.path.exists(args[0]) or not is_key_value(args[0])):
        path = args.pop(0)
    return path, from_cli_args(args)


def _train(words: list[str]) -> int:
    if any(w in ("-h", "--help") for w in words):
        print(_train_help(_chosen_trainer([w for w in words if w not in ("-h", "--help")])))
        return 0
    path, overrides = _split_train_args(words)
    # Every configuration mistake surfaces here, before torch or any model loads. Without a file, a run that names
    # its model trains it from the trainer's defaults; one that does not is the offline digits quickstart.
    quickstart = path is None and load_config(None, overrides).model is None
    load_config(quickstart_preset(overrides) if quickstart else path, overrides)
    from diffrl.recipes.accelerator import close_processes  # heavy (torch): only when training

    if quickstart:
        from diffrl.commands.quickstart import run_quickstart

        status = run_quickstart(overrides)
    else:
        from diffrl.commands.train import train_from_config

        status = train_from_config(path, overrides)
    close_processes()  # every process leaves the group together (a finished run, not a failed one)
    return status


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; subcommands of :data:`COMMANDS` appear by name and take their arguments later."""
    parser = argparse.ArgumentParser(
        prog="diffrl",
        description="Fine-tune diffusion models against reward functions with reinforcement learning "
        "(DDPO) and reward backpropagation (AlignProp, DRaFT, ReFL).",
    )
    parser.add_argument("--version", action="version", version=f"diffrl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("train", help="fine-tune a model (no config: the offline digits quickstart)", add_help=False)
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.help, add_help=False)
    return parser


def _split_argv(argv: Sequence[str]) -> tuple[list[str], str | None, list[str]]:
    """(global options, the subcommand or None, the subcommand's own arguments)."""
    for index, word in enumerate(argv):
        if not word.startswith("-"):
            return list(argv[:index]), word, list(argv[index + 1:])
    return list(argv), None, []


def _command_parser(name: str) -> argparse.ArgumentParser:
    """The full parser of one subcommand, built by the module that owns it."""
    command = COMMANDS[name]
    parser = argparse.ArgumentParser(prog="diffrl")
    sub = parser.add_subparsers(dest="command")
    getattr(importlib.import_module(command.module), command.add_parser)(sub)
    return parser


class _TorchvisionFallbackFilter(logging.Filter):
    """transformers announces on import that its image processors fall back to Pillow without torchvision
    (there is no CPU build of torchvision on PyPI for every platform); diffrl never uses that path for
    training, so the notice is noise in the CLI. Other transformers warnings pass through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def _is_user_error(err: Exception) -> bool:
    """A user mistake: a config error, or a ``ValueError`` subclass that diffrl defines (``RewardError``,
    ``ModelLoadError``, ...), whose message names the setting, the value and the fix by convention."""
    if isinstance(err, (ConfigError, KeyValueError)):
        return True
    return isinstance(err, ValueError) and type(err) is not ValueError and type(err).__module__.startswith("diffrl.")


def _is_run_failure(err: Exception) -> bool:
    """A run that failed for a reason its message explains (the divergence guard's ``DivergenceError``, a full
    disk, a folder without write permission): one line, exit 1, everything already written stays intact."""
    diffrl_runtime = isinstance(err, RuntimeError) and type(err).__module__.startswith("diffrl.")
    return diffrl_runtime or (isinstance(err, OSError) and err.errno is not None)


def _report_failure(command: str, err: Exception) -> int:
    if isinstance(err, OSError) and err.filename:
        print(f"diffrl {command}: error: {err.strerror} writing {err.filename}", file=sys.stderr)
    else:
        print(f"diffrl {command}: error: {str(err).strip()}", file=sys.stderr)
    return 1


def _report(command: str, err: Exception) -> int:
    if isinstance(err, ConfigError) and err.violations:
        for violation in err.violations:
            print(f"diffrl {command}: error: {violation}", file=sys.stderr)
    else:
        print(f"diffrl {command}: error: {str(err).strip()}", file=sys.stderr)
    return USAGE_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackFilter())
    argv = list(sys.argv[1:] if argv is None else argv)
    options, command, rest = _split_argv(argv)
    parser = build_parser()
    args = parser.parse_args(options + ([command] if command else []))  # --help, --version, unknown commands
    if command is None:
        parser.print_help()
        return 0
    debug = args.debug or "--debug" in rest
    rest = [word for word in rest if word != "--debug"]
    try:
        if command == "train":
            return _train(rest)
        command_args = _command_parser(command).parse_args([command, *rest])
        command_args.debug = debug
        return int(command_args.func(command_args) or 0)
    except Exception as err:
        if not debug and _is_run_failure(err):
            return _report_failure(command, err)
        if debug or not _is_user_error(err):
            raise
        return _report(command, err)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
