"""Parameter and multiply-add counts, per model and per stage.

Multiply-adds (MACs) come from ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2), never
from hand formulas. It counts convolutions and matrix products, i.e. what the ResNet paper
calls FLOPs ("multiply-adds", e.g. 3.6e9 for ResNet-34); BatchNorm, ReLU, pooling and the
shortcut additions are not counted. Shapes and counts are computed on the ``meta`` device by
default: no memory is allocated and no arithmetic runs, so the whole zoo takes seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from resnetlab.catalog import format_macs, format_shape, render_table
from resnetlab.catalog import format_model_table as format_model_table  # re-exported

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


def model_table(pattern: str = "*", use_catalog: bool = True) -> list[dict[str, Any]]:
    """One row per registered model matching ``pattern``.

    Rows: ``{"name", "params", "macs", "input_size"}`` with MACs at the model's native input
    size (32x32 CIFAR, 224x224 ImageNet) and its default number of classes. With
    ``use_catalog`` the rows come from the shipped catalog when it matches the model sources
    (:mod:`resnetlab.catalog`); otherwise they are counted here (seconds for resnet1202).
    """
    if use_catalog:
        from resnetlab.catalog import cached_rows

        rows = cached_rows(pattern)
        if rows is not None:
            return rows
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
            format_shape(r["output_shape"]),
            f"{r['params']:,}",
            format_macs(r["macs"]),
        )
        for r in rows
    ]
    total_params = sum(r["params"] for r in rows)
    total_macs = sum(r["macs"] for r in rows)
    body.append(("total", "", "", f"{total_params:,}", format_macs(total_macs)))
    title = f"{rows[0]['model']}\n" if rows and "model" in rows[0] else ""
    return title + render_table(("stage", "blocks", "output", "params", "MACs"), body)


def build_catalog() -> dict[str, Any]:
    """Count every registered model afresh: the document :mod:`resnetlab.catalog` reads."""
    from resnetlab.catalog import models_fingerprint

    rows = model_table("*", use_catalog=False)
    return {"fingerprint": models_fingerprint(), "torch": torch.__version__,
            "models": [{**r, "input_size": list(r["input_size"])} for r in rows]}


def write_catalog(path: str | None = None) -> Path:
    """Recompute and write ``models/catalog.json`` (or ``path``); returns the file written."""
    import json

    from resnetlab.catalog import CATALOG_FILE

    out = Path(path) if path else CATALOG_FILE
    doc = build_catalog()
    rows = ",\n".join("  " + json.dumps(r) for r in doc.pop("models"))  # one model per line
    head = json.dumps(doc)[:-1]
    out.write_text(f'{head}, "models": [\n{rows}\n]}}\n')
    return out
