"""Lazy package attributes (PEP 562): a package ``__init__`` names what each submodule defines,
and the submodule is imported on first use, so importing the package stays cheap (no torch for
``resnetlab --help``). One helper for ``models``, ``data`` and ``analysis``::

    _LAZY = {"create_model": "registry", ...}        # name -> submodule that defines it
    __getattr__, __dir__ = attach(__name__, _LAZY)

A leaf: imports nothing of the package.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def attach(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``names[attr]`` is the submodule (relative to
    ``package``) that defines ``attr``; the value is cached in the package once imported."""

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted([*vars(sys.modules[package]), *names])

    return __getattr__, __dir__


__all__ = ["attach"]
