"""The arguments of the ``reproduce`` experiments: one check per argument, shared by all of them,
run before any work starts (no net is trained before a bad ``grid`` is found).

:data:`BOUNDS` holds one named :class:`~resnetlab.bounds.Bound` per numeric argument (keyed by
its Python name). Every reproduce function (and ``landscape``) calls :func:`check` with its
arguments first, so every caller gets the same one-line refusal, naming the parameter (``grid``)
in Python and its flag (``--grid``) at the command line (:mod:`resnetlab.params`)::

    from resnetlab.analysis import args
    args.check(epochs=epochs, seed=seed, jobs=jobs, grid=grid)   # AnalysisError naming the parameter
    names = args.models(models)                                  # registered, distinct, not empty

A new experiment adds its arguments here (and calls :func:`check` at its top).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from resnetlab.analysis.errors import AnalysisError
from resnetlab.bounds import Bound, BoundError
from resnetlab.params import named

#: The splits an analysis reads images from, and the BatchNorm modes of the landscape.
Split = Literal["train", "val", "test"]
BnMode = Literal["batch", "eval"]

#: key -> its bound. The key is the Python parameter it checks, and so is the bound's name (the
#: message says ``grid must be ...``; the CLI shows ``--grid``), except where two functions give one
#: parameter name different ranges (``gradient_steps``: gradient_flow's ``steps``, which may be 0).
#: Upper bounds stop a typo (1e12 epochs, a 100000-point grid) from running until killed.
BOUNDS: dict[str, Bound] = {
    "epochs": Bound("epochs", 1, 10_000, why="the paper's CIFAR runs take 164"),
    "pretrain_epochs": Bound("pretrain_epochs", 1, 10_000),
    "steps": Bound("steps", 1, 100_000, why="optimiser steps per run"),
    "gradient_steps": Bound("steps", 0, 100_000, why="training steps before the second measurement"),
    "estimate_steps": Bound("estimate_steps", 1, 1_000),
    "seed": Bound("seed", 0, 2**64 - 1, why="the config's seed range"),
    "jobs": Bound("jobs", 1, 256, why="worker processes"),
    "grid": Bound("grid", 3, 201, why="3 for a second difference; a 2-D grid of 201 is 40,401 points"),
    "span": Bound("span", 0, 100, integer=False, low_open=True, why="filter-normalised units"),
    "dims": Bound("dims", 1, 2),
    "images": Bound("images", 1, 65_536),
    "chunk": Bound("chunk", 1, 1_024, why="grid points per forward pass"),
    "hessian_iters": Bound("hessian_iters", 0, 1_000, why="0 skips the Hessian"),
    "n": Bound("n", 1, 100_000, why="labelled images per class"),
}


def check(**values: object) -> None:
    """Check every named value against :data:`BOUNDS` (``None``: the default, not checked).

    Raises :class:`AnalysisError` ``"grid must be an integer from 3 to 201 (...), got 100000"``,
    carrying the parameter (:func:`resnetlab.params.named`) so the CLI can show its flag.
    """
    for key, value in values.items():
        if value is None:
            continue
        try:
            BOUNDS[key].check(value)
        except BoundError as e:
            raise _as_analysis_error(e, BOUNDS[key].name) from None


def _as_analysis_error(e: BoundError, param: str, each: bool = False) -> AnalysisError:
    detail = str(getattr(e, "detail", e))
    if each:  # one value of a list: "seeds must each be an integer from 0 ..."
        detail = "must each be " + detail.removeprefix("must be ")
    return named(AnalysisError, param, detail)  # type: ignore[return-value]


def _words(text: str | Sequence[str]) -> list[str]:
    return [n for n in (text.replace(",", " ").split() if isinstance(text, str) else text) if n]


def models(text: str | Sequence[str], param: str = "models") -> list[str]:
    """``"plain56,resnet56"`` (or a list) -> registered names, at least one, none twice.

    ``param`` is the caller's parameter that ``text`` came in (named in the error)."""
    from resnetlab.models import list_models

    names = _words(text)
    if not names:
        raise named(AnalysisError, param, "must name at least one registered model, e.g. resnet20,resnet56")
    known = list_models()
    for n in names:
        if n not in known:
            raise named(AnalysisError, param, f"names unknown model {n!r}; see `resnetlab models`")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise named(AnalysisError, param, f"names {repeated[0]!r} twice; each model is trained once")
    return names


def _ints(text: str | Sequence[int], param: str, example: str) -> tuple[int, ...]:
    """``"5,10,20"`` / ``"5 10 20"`` / a list -> the values, at least one, none twice."""
    if isinstance(text, str):
        try:
            values = tuple(int(p) for p in text.replace(",", " ").split())
        except ValueError:
            raise named(AnalysisError, param, f"must be integers like {example}, got {text!r}") from None
    else:
        values = tuple(text)
    if not values:
        raise named(AnalysisError, param, f"must give at least one value, e.g. {example}")
    if len(set(values)) != len(values):
        raise named(AnalysisError, param, f"has a repeated value in {','.join(map(str, values))}")
    return values


def int_list(text: str | Sequence[int], param: str, example: str, key: str | None = None) -> tuple[int, ...]:
    """``"5,10,20"`` (or a list of ints) -> distinct ints, each within ``BOUNDS[key]`` (``key``
    defaults to ``param``, the caller's parameter named in the error), in the order given."""
    values = _ints(text, param, example)
    bound = BOUNDS[key or param]
    for v in values:
        try:
            bound.check(v)
        except BoundError as e:
            raise _as_analysis_error(e, param, each=True) from None
    return tuple(int(v) for v in values)


def int_choices(text: str | Sequence[int], param: str, example: str, allowed: Sequence[int],
                what: str) -> tuple[int, ...]:
    """``"20,56"`` (or a list) -> distinct ints, each one of ``allowed``; a bad one is named with
    ``what`` it should be (``"a depth with a plain and a residual twin"``) and the choices."""
    values = _ints(text, param, example)
    bad = [v for v in values if v not in allowed]
    if bad:
        raise named(AnalysisError, param,
                    f"has {bad[0]}, which is not {what}; choose from {', '.join(map(str, allowed))}")
    return tuple(int(v) for v in values)


def fixed_by_experiment(overrides: Sequence[str], keys: Sequence[str], what: str) -> None:
    """Refuse a ``key=value`` override of a key the experiment sets itself (``what`` says which
    things those keys carry, e.g. ``"the nets and seeds"``)."""
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if key in keys:
            raise named(AnalysisError, "overrides", f"may not set {key} ({o!r}): the experiment sets {what} itself")


def one_of(value: object, param: str, choices: Sequence[object]) -> None:
    """Refuse ``value`` unless it is one of ``choices``: ``"bn must be one of batch, eval, got 'x'"``."""
    if value not in choices:
        raise named(AnalysisError, param, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


__all__ = ["BOUNDS", "check", "int_choices", "int_list", "models", "one_of", "fixed_by_experiment", "Split", "BnMode"]
