"""The data layer's errors (a leaf: the source modules raise them without importing torch)."""

from __future__ import annotations


class DataError(ValueError):
    """A data file, folder or setting is wrong; the message names the one at fault."""


class BadImageError(DataError):
    """An image file cannot be read; the message starts with the file's path."""


class ImageTooLargeError(DataError):
    """A decoded image is over a size limit of preprocessing (e.g. too elongated to resize):
    the image is readable, the work it asks for is not allowed (serve answers 400, not 415)."""


__all__ = ["BadImageError", "DataError", "ImageTooLargeError"]
