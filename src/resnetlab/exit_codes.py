"""Process exit codes: the one mapping the CLI, ``fit`` and the analyses share.

A leaf (standard library only), so ``resnetlab --help`` and the CLI's error handling need no torch.
"""

from __future__ import annotations

EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130, "SIGPIPE": 141}  # 128 + signal number, as shells report
EXIT_USER_ERROR = 2  # bad config, data or checkpoint: the message says what to change (argparse's code too)
EXIT_FAILURE = 1  # the OS refused (disk full, read-only), or a run stopped for another reason


def exit_code(interrupted: str | None) -> int:
    """The process exit code of a run (or a set of runs) that ``interrupted`` stopped: 0 when it
    finished or was stopped on purpose (``"stop"``), the shell's code for a signal (130 Ctrl-C,
    143 SIGTERM), else 1. The one mapping the CLI, ``fit`` and the analyses share."""
    if interrupted in (None, "stop"):
        return 0
    return EXIT_CODES.get(str(interrupted), EXIT_FAILURE)


__all__ = ["EXIT_CODES", "EXIT_FAILURE", "EXIT_USER_ERROR", "exit_code"]
