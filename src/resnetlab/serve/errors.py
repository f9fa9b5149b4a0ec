"""The one error type of ``resnetlab serve``'s routes (v1 and the Open Inference Protocol v2)."""

from __future__ import annotations


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


__all__ = ["ApiError"]
