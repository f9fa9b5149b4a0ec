"""Numeric bounds that name themselves: one check per argument, one message form.

A :class:`Bound` knows the name the user writes (``--grid``), the kind (integer or finite
number) and the closed range allowed. ``check`` takes a value from Python, ``parse`` a word
from the command line, ``argtype`` makes an argparse ``type=``; all refuse with the same line::

    --grid must be an integer from 3 to 201 (a 2-D grid of 201 is 40,401 forward passes), got 100000

A leaf module (imports nothing of resnetlab but the leaf :mod:`resnetlab.params`): the serve options and the reproduce arguments both
use it.
"""

from __future__ import annotations

import argparse
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

from resnetlab.params import named


class BoundError(ValueError):
    """A value outside its :class:`Bound`; the message names the argument, the range and the value."""


@dataclass(frozen=True)
class Bound:
    """``low <= value <= high`` (``low < value`` when ``low_open``), integer or finite float."""

    name: str  # the Python parameter, e.g. "grid"; the CLI shows its flag (resnetlab.params)
    low: float
    high: float
    integer: bool = True
    low_open: bool = False  # exclude ``low`` itself (a span or a time must be > 0)
    why: str = ""  # why the upper bound is where it is, shown in the message

    def rule(self) -> str:
        """``"an integer from 1 to 64"`` / ``"a number > 0 and <= 3600"``."""
        if self.integer:
            return f"an integer from {int(self.low):,} to {int(self.high):,}"
        return f"a number {'>' if self.low_open else '>='} {self.low:g} and <= {self.high:g}"

    def _refuse(self, shown: object) -> BoundError:
        why = f" ({self.why})" if self.why else ""
        return named(BoundError, self.name, f"must be {self.rule()}{why}, got {shown}")  # type: ignore[return-value]

    def check(self, value: object) -> int | float:
        """``value`` when it is in range (ints stay ints), else :class:`BoundError`."""
        if isinstance(value, bool):
            raise self._refuse(repr(value))
        number: int | float
        if self.integer:
            try:
                number = operator.index(value)  # type: ignore[arg-type]  # int, numpy ints; not 2.0
            except TypeError:
                raise self._refuse(repr(value)) from None
        else:
            if not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
                raise self._refuse(repr(value))
            number = float(value)  # type: ignore[arg-type]
            if not math.isfinite(number):
                raise self._refuse(repr(value))
        too_low = number <= self.low if self.low_open else number < self.low
        if too_low or number > self.high:
            raise self._refuse(repr(value))
        return number

    def parse(self, text: str) -> int | float:
        """A command-line word -> the checked number."""
        try:
            value: int | float = int(text.strip()) if self.integer else float(text)
        except ValueError:
            raise self._refuse(repr(text)) from None
        return self.check(value)

    def argtype(self) -> Callable[[str], int | float]:
        """An argparse ``type=``: a bad word ends argparse's usage line with :meth:`rule`."""
        def parse(text: str) -> int | float:
            try:
                return self.parse(text)
            except BoundError as e:
                raise argparse.ArgumentTypeError(str(e).removeprefix(f"{self.name} ")) from None

        parse.__name__ = self.name.lstrip("-")
        return parse


__all__ = ["Bound", "BoundError"]
