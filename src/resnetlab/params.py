"""Errors that name a parameter: the library speaks in Python names, the command line in flags.

A library function refuses an argument by the name its caller wrote, the Python parameter::

    raise named(AnalysisError, "grid", "must be an integer from 3 to 201, got 100000")
    # str(e) == "grid must be an integer from 3 to 201, got 100000"

The exception keeps ``param`` and ``detail``. The CLI knows which flag fills which parameter (an
argparse action's ``dest``), so it rewrites the same error for the person at the shell as
``--grid must be an integer from 3 to 201, got 100000`` (:func:`for_cli`). A parameter with no
flag in the command that ran (a key=value word, a library-only argument) keeps its Python name.

Advice that names a parameter mid-sentence uses :func:`mention`: the library says
``out.onnx already exists; pass force=True to overwrite it``, the CLI ``... pass --force ...``.
Advice pointing at another command names it without flags (its ``--help`` has them) or names a
config key (``train.resume=auto``), which both the library and the command line accept.

A leaf (standard library only): ``bounds``, the analyses, serving and the CLI all use it.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping


def named(cls: type[BaseException], param: str, detail: str, *args: object) -> BaseException:
    """An instance of ``cls`` whose message is ``"<param> <detail>"`` and which carries ``param``
    and ``detail`` for :func:`for_cli`. ``args`` follow the message (for classes that take more)."""
    error = cls(f"{param} {detail}", *args)
    error.param = param  # type: ignore[attr-defined]
    error.detail = detail  # type: ignore[attr-defined]
    return error


def mention(cls: type[BaseException], message: str, *args: object, **spelled: str) -> BaseException:
    """An instance of ``cls`` whose message names parameters mid-sentence, as advice rather than a
    bad value: ``spelled`` maps each parameter to the text the message writes for it in Python
    (``force="force=True"`` in "pass force=True to overwrite it"); :func:`for_cli` writes the flag
    (``--force``) in its place. For switches and bare names: a flag's value is not rewritten."""
    error = cls(message, *args)
    error.mentions = dict(spelled)  # type: ignore[attr-defined]
    return error


def param_of(error: BaseException) -> str | None:
    """The parameter ``error`` names (set by :func:`named`), or ``None``."""
    param = getattr(error, "param", None)
    return param if isinstance(param, str) else None


def flags_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``dest -> the flag a user types`` for ``parser``'s options (the longest option string:
    ``--max-batch`` rather than ``-b``); positionals map to their metavar (``RUN``)."""
    flags: dict[str, str] = {}
    for action in parser._actions:  # argparse keeps no public list of its actions
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            flags[action.dest] = max(action.option_strings, key=len)
        elif isinstance(action.metavar, str):
            flags[action.dest] = action.metavar
    return flags


def for_cli(error: BaseException, flags: Mapping[str, str]) -> str:
    """``error``'s message with its parameter written as the flag that sets it (``flags``: what
    :func:`flags_of` gives for the command that ran); the plain message otherwise."""
    param = param_of(error)
    detail = getattr(error, "detail", None)
    if param is not None and param in flags and isinstance(detail, str):
        message = f"{flags[param]} {detail}"
    else:
        message = str(error)
    mentions = getattr(error, "mentions", None)
    if isinstance(mentions, dict):
        for name, spelled in mentions.items():
            if name in flags and isinstance(spelled, str) and spelled:
                message = message.replace(spelled, flags[name])
    return message


__all__ = ["flags_of", "for_cli", "mention", "named", "param_of"]
