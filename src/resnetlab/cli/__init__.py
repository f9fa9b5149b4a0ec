"""Command line: parse -> Config -> call one library function. No logic lives here.

Each subcommand is a pair: ``add_<name>(subparsers)`` declares its arguments and
``run_<name>(args)`` calls the library and returns the exit code. The pairs live in one module per
area (train, info, use, serve, reproduce, analysis, weights), each with a ``COMMANDS`` table; this
module only builds the parser from those tables, maps errors to exit codes and runs the chosen
command.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from resnetlab.cli import analysis, info, reproduce, serve, train, use, weights
from resnetlab.exit_codes import EXIT_FAILURE, EXIT_USER_ERROR, exit_code
from resnetlab.params import flags_of, for_cli


def _user_errors() -> tuple[type[BaseException], ...]:
    from resnetlab.calibration import CalibrationError
    from resnetlab.checkpoint import CheckpointError
    from resnetlab.config import ConfigError
    from resnetlab.data import DataError
    from resnetlab.engine.errors import TrainingError
    from resnetlab.weights.zoo import WeightsError

    return (ConfigError, DataError, CheckpointError, TrainingError, WeightsError, CalibrationError,
            FileNotFoundError)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be redirected after set-up)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _setup_logging(quiet: bool = False) -> None:
    logger = logging.getLogger("resnetlab")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    if logger.level == logging.NOTSET:  # ranks other than 0 have already raised theirs
        logger.setLevel(logging.WARNING if quiet else logging.INFO)


# `resnetlab --help` lists the commands in this order
COMMANDS: dict[str, tuple[Callable, Callable]] = {
    **train.COMMANDS, **info.COMMANDS, **use.COMMANDS, **serve.COMMANDS, **reproduce.COMMANDS,
    **analysis.COMMANDS,
    **weights.COMMANDS,
}


# commands whose RUN|CKPT argument may be `latest`: the newest run under runs/
LATEST_COMMANDS = ("eval", "predict", "explain", "export", "serve")


def build_parser() -> argparse.ArgumentParser:
    from resnetlab import __version__

    parser = argparse.ArgumentParser(prog="resnetlab", description="Deep residual networks in PyTorch.")
    parser.add_argument("--version", action="version", version=f"resnetlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    _record_flags(parser)
    return parser


def _record_flags(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command's parser a ``_flags`` default: its ``dest -> flag`` table, which
    turns a library error naming a parameter (``grid``) into the flag the user typed (``--grid``)."""
    children = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in children:
        for child in set(action.choices.values()):
            _record_flags(child)
    if not children:  # the leaf that runs: its table is the one the error is read against
        parser.set_defaults(_flags=flags_of(parser))


_OPTION_KEYS = {"model": "model.name", "arch": "model.name", "a": "model.name", "dataset": "data.name",
                "data": "data.name", "data_path": "data.root", "data_dir": "data.root", "root": "data.root",
                "b": "train.batch_size", "lr": "optim.lr", "wd": "optim.weight_decay", "opt": "optim.name",
                "sched": "optim.schedule", "j": "data.num_workers", "workers": "data.num_workers",
                "output": "run.root", "output_dir": "run.root", "out_dir": "run.root",
                "warmup_epochs": "optim.warmup_epochs", "smoothing": "optim.label_smoothing",
                "pretrained": "model.init_from", "weights": "model.init_from", "num_classes": "model.num_classes"}


def option_hint(option: str, value: str | None) -> str | None:
    """For an unknown ``--option [value]``: the ``key=value`` override it most likely meant."""
    from resnetlab.config import Config
    from resnetlab.config import all_keys as _all_keys

    name = option.lstrip("-").split("=", 1)[0]
    keys = _all_keys(Config)
    key: str | None
    if name in keys:
        key = name
    else:
        norm = name.replace("-", "_")
        matches = [k for k in keys if k.rsplit(".", 1)[-1] == norm]
        key = matches[0] if len(matches) == 1 else _OPTION_KEYS.get(norm)
    if key is None:
        return None
    if key == "model.init_from" and key not in keys:  # the weights key, named before it exists
        return ("resnetlab downloads nothing; start from saved weights with model.init_from=RUN|CKPT, "
                "or import torchvision weights on disk with `resnetlab import torchvision FILE.pth --arch NAME`")
    shown = value if value is not None else "VALUE"
    return f"config values are key=value words: did you mean `{key}={shown}`?"


def _unknown_options(extra: list[str], argv: list[str]) -> str:
    """The message for unrecognised arguments, with a key=value hint where one fits."""
    for tok in extra:
        if not tok.startswith("-"):
            continue
        if "=" in tok:
            value: str | None = tok.split("=", 1)[1]
        else:
            i = argv.index(tok) if tok in argv else -1
            nxt = argv[i + 1] if 0 <= i < len(argv) - 1 else None
            value = nxt if nxt is not None and not nxt.startswith("-") and "=" not in nxt else None
        hint = option_hint(tok, value)
        if hint:
            return f"unrecognized option {tok.split('=', 1)[0]}; {hint}"
    return f"unrecognized arguments: {' '.join(extra)}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also come after options: `eval RUN --split test data.root=x`
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(_unknown_options(extra, argv))
    _setup_logging(getattr(args, "quiet", False))
    try:
        if getattr(args, "path", None) == "latest" and args.command in LATEST_COMMANDS:
            from resnetlab.runtime import newest_run

            args.path = str(newest_run())
        return COMMANDS[args.command][1](args)
    except _user_errors() as e:
        print(f"resnetlab {args.command}: error: {for_cli(e, getattr(args, '_flags', {}))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return exit_code("SIGINT")
    except BrokenPipeError:  # `resnetlab predict ... | head`: the reader left; stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return exit_code("SIGPIPE")  # what a shell reports for a program killed by the broken pipe
    except OSError as e:  # disk full, read-only, permission denied, a file where a folder should be
        from resnetlab.outputs import describe_os_error

        print(f"resnetlab {args.command}: error: {describe_os_error(e)}", file=sys.stderr)
        return EXIT_FAILURE
