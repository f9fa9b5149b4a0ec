"""The data layer's errors (a leaf: the source modules raise them without importing torch)."""

from __future__ import annotations


class DataError(ValueError):
    """A data file, folder or setting is wrong; the message names the one at fault."""


class BadImageError(DataError):
    """An image file cannot be read; the message starts with the file's path."""


__all__ = ["BadImageError", "DataError"]
