"""Parameter and multiply-add counts, per model and per stage.

Multiply-adds (MACs) come from ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2), never
from hand formulas. It counts convolutions and matrix products, i.e. what the ResNet paper
calls FLOPs ("multiply-adds", e.g. 3.6e9 for ResNet-34); BatchNorm, ReLU, pooling and the
shortcut additions are not counted. Shapes and counts are computed on the ``meta`` device by
default: no memory is allocated and no arithmetic runs, so the whole zoo takes seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .registry import create_model, list_models


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (elements), optionally only those with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _example_input(model: nn.Module, input_size: Sequence[int]) -> torch.Tensor:
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    return torch.zeros(1, *input_size, device=device, dtype=dtype)  # [1, c, h, w]


def _resolve_input_size(model: nn.Module, input_size: Sequence[int] | None) -> tuple[int, ...]:
    size = input_size if input_size is not None else getattr(model, "input_size", None)
    if size is None:
        raise ValueError("input_size is required for a model without an .input_size attribute")
    return tuple(int(s) for s in size)


def count_macs(model: nn.Module, input_size: Sequence[int] | None = None) -> int:
    """Multiply-adds of one eval-mode forward pass on a batch of one ``[1, *input_size]``.

    ``input_size`` is ``(c, h, w)``; default ``model.input_size`` (the native resolution).
    Works on the ``meta`` device. The model's train/eval mode is restored afterwards.
    """
    x = _example_input(model, _resolve_input_size(model, input_size))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2  # one multiply-add = 2 FLOPs


def model_table(pattern: str = "*") -> list[dict[str, Any]]:
    """One row per registered model matching ``pattern``.

    Rows: ``{"name", "params", "macs", "input_size"}`` with MACs at the model's native input
    size (32x32 CIFAR, 224x224 ImageNet) and its default number of classes.
    """
    rows = []
    for name in list_models(pattern):
        with torch.device("meta"):  # no allocation, no init arithmetic
            model = create_model(name)
        rows.append(
            {
                "name": name,
                "params": count_params(model),
                "macs": count_macs(model),
                "input_size": tuple(model.input_size),
            }
        )
    return rows


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _fmt_macs(n: int) -> str:
    return f"{n / 1e9:.2f}G" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def _render(header: Sequence[str], body: Sequence[Sequence[str]], left: int = 1) -> str:
    """Aligned text table; the first ``left`` columns are left-aligned, the rest right."""
    table = [list(header), *[list(r) for r in body]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(table[0]), rule, *(line(r) for r in table[1:])])


def format_model_table(rows: Sequence[dict[str, Any]]) -> str:
    """Render ``model_table()`` rows: name, parameters (M), multiply-adds (M/G), input size."""
    body = [
        (r["name"], _fmt_params(r["params"]), _fmt_macs(r["macs"]), _fmt_shape(r["input_size"]))
        for r in rows
    ]
    return _render(("model", "params", "MACs", "input"), body)


def model_info(
    name: str, input_size: Sequence[int] | None = None, **overrides: Any
) -> list[dict[str, Any]]:
    """Per-stage breakdown of ``create_model(name, **overrides)``.

    One row per piece of ``ResNet.named_stages()`` (stem, layer1.., pool, fc):
    ``{"model", "stage", "blocks", "output_shape", "params", "macs"}``, where ``output_shape``
    is ``(c, h, w)`` or ``(features,)`` for a batch of one at ``input_size`` (default native).
    Runs on the meta device.
    """
    with torch.device("meta"):
        model = create_model(name, **overrides)
    model.eval()
    x = _example_input(model, _resolve_input_size(model, input_size))
    rows = []
    with torch.no_grad():
        for stage, module in model.named_stages():
            with FlopCounterMode(display=False) as counter:
                x = module(x)
            rows.append(
                {
                    "model": name,
                    "stage": stage,
                    "blocks": len(module) if stage.startswith("layer") else 0,  # type: ignore[arg-type]
                    "output_shape": tuple(x.shape[1:]),
                    "params": count_params(module),
                    "macs": counter.get_total_flops() // 2,
                }
            )
    return rows


def format_model_info(rows: Sequence[dict[str, Any]]) -> str:
    """Render ``model_info()`` rows as a table with a total line."""
    body = [
        (
            r["stage"],
            str(r["blocks"]) if r["blocks"] else "",
            _fmt_shape(r["output_shape"]),
            f"{r['params']:,}",
            _fmt_macs(r["macs"]),
        )
        for r in rows
    ]
    total_params = sum(r["params"] for r in rows)
    total_macs = sum(r["macs"] for r in rows)
    body.append(("total", "", "", f"{total_params:,}", _fmt_macs(total_macs)))
    title = f"{rows[0]['model']}\n" if rows and "model" in rows[0] else ""
    return title + _render(("stage", "blocks", "output", "params", "MACs"), body)
