"""The arguments of the ``reproduce`` experiments: one check per argument, shared by all of them,
run before any work starts (no net is trained before a bad ``--grid`` is found).

:data:`BOUNDS` holds one named :class:`~resnetlab.bounds.Bound` per numeric argument (keyed by
its Python name). Every reproduce function (and ``landscape``) calls :func:`check` with its
arguments first, so the CLI and library callers get the same one-line refusal::

    from resnetlab.analysis import args
    args.check(epochs=epochs, seed=seed, jobs=jobs, grid=grid)   # AnalysisError naming the flag
    names = args.models(models)                                  # registered, distinct, not empty

A new experiment adds its arguments here (and calls :func:`check` at its top).
"""

from __future__ import annotations

from collections.abc import Sequence

from resnetlab.analysis.errors import AnalysisError
from resnetlab.bounds import Bound, BoundError

#: Python name -> its bound. Upper bounds stop a typo (1e12 epochs, a 100000-point grid) from
#: running until killed; each says what it allows.
BOUNDS: dict[str, Bound] = {
    "epochs": Bound("--epochs", 1, 10_000, why="the paper's CIFAR runs take 164"),
    "pretrain_epochs": Bound("--pretrain-epochs", 1, 10_000),
    "steps": Bound("--steps", 1, 100_000, why="optimiser steps per run"),
    "gradient_steps": Bound("--steps", 0, 100_000, why="training steps before the second measurement"),
    "estimate_steps": Bound("--estimate-steps", 1, 1_000),
    "seed": Bound("--seed", 0, 2**64 - 1, why="the config's seed range"),
    "jobs": Bound("--jobs", 1, 256, why="worker processes"),
    "grid": Bound("--grid", 3, 201, why="3 for a second difference; a 2-D grid of 201 is 40,401 points"),
    "span": Bound("--span", 0, 100, integer=False, low_open=True, why="filter-normalised units"),
    "dims": Bound("--dims", 1, 2),
    "images": Bound("--images", 1, 65_536),
    "chunk": Bound("--chunk", 1, 1_024, why="grid points per forward pass"),
    "hessian_iters": Bound("--hessian-iters", 0, 1_000, why="0 skips the Hessian"),
    "n": Bound("--n", 1, 100_000, why="labelled images per class"),
}


def check(**values: object) -> None:
    """Check every named value against :data:`BOUNDS` (``None``: the default, not checked).

    Raises :class:`AnalysisError` ``"--grid must be an integer from 3 to 201 (...), got 100000"``.
    """
    for key, value in values.items():
        if value is None:
            continue
        try:
            BOUNDS[key].check(value)
        except BoundError as e:
            raise AnalysisError(str(e)) from None


def models(text: str | Sequence[str], flag: str = "--models") -> list[str]:
    """``"plain56,resnet56"`` (or a list) -> registered names, at least one, none twice."""
    from resnetlab.models import list_models

    names = [n for n in (text.replace(",", " ").split() if isinstance(text, str) else text) if n]
    if not names:
        raise AnalysisError(f"{flag}: give at least one registered model name, e.g. {flag} resnet20,resnet56")
    known = list_models()
    for n in names:
        if n not in known:
            raise AnalysisError(f"{flag}: unknown model {n!r}; see `resnetlab models`")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise AnalysisError(f"{flag}: {repeated[0]!r} is named twice; each model is trained once")
    return names


def _ints(text: str | Sequence[int], flag: str, example: str) -> tuple[int, ...]:
    """``"5,10,20"`` / ``"5 10 20"`` / a list -> the values, at least one, none twice."""
    if isinstance(text, str):
        try:
            values = tuple(int(p) for p in text.replace(",", " ").split())
        except ValueError:
            raise AnalysisError(f"{flag}: expected integers like {example}, got {text!r}") from None
    else:
        values = tuple(text)
    if not values:
        raise AnalysisError(f"{flag}: give at least one, e.g. {flag} {example}")
    if len(set(values)) != len(values):
        raise AnalysisError(f"{flag}: repeated value in {','.join(map(str, values))}")
    return values


def int_list(text: str | Sequence[int], key: str, flag: str, example: str) -> tuple[int, ...]:
    """``"5,10,20"`` (or a list of ints) -> distinct ints, each within ``BOUNDS[key]``, in order given."""
    values = _ints(text, flag, example)
    for v in values:
        try:
            BOUNDS[key].check(v)
        except BoundError as e:
            raise AnalysisError(f"{flag}: each {str(e).removeprefix(BOUNDS[key].name + ' ')}") from None
    return tuple(int(v) for v in values)


def int_choices(text: str | Sequence[int], flag: str, example: str, allowed: Sequence[int],
                what: str) -> tuple[int, ...]:
    """``"20,56"`` (or a list) -> distinct ints, each one of ``allowed``; a bad one is named with
    ``what`` it should be (``"a depth with a plain and a residual twin"``) and the choices."""
    values = _ints(text, flag, example)
    bad = [v for v in values if v not in allowed]
    if bad:
        raise AnalysisError(f"{flag}: {bad[0]} is not {what}; choose from {', '.join(map(str, allowed))}")
    return tuple(int(v) for v in values)


__all__ = ["BOUNDS", "check", "int_choices", "int_list", "models"]
