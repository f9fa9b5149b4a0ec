"""Gradient flow: how large the gradient is at each depth, with and without shortcuts.

For each model, on one fixed probe batch, in training mode (batch statistics, as in training):

- the L2 norm of the gradient of every convolution's weight, ``||dL/dW||``;
- the L2 norm of the gradient reaching every block's output, ``||dL/dx_l||``, caught with a
  tensor hook (``output.register_hook``) registered by a forward hook on each block.

Both are measured at initialisation and again after ``steps`` SGD steps of the data's recipe
(the degradation experiment's). Writes ``gradients.csv`` (one row per model, phase, layer),
``gradients.png``/``.svg`` (norm against depth, log scale) and ``summary.json`` with the ratio
of the first block's to the last block's output-gradient norm per model: near 1 means the
gradient reaches the input side of the network undiminished.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnetlab.analysis import args
from resnetlab.analysis.errors import AnalysisError
from resnetlab.config import Config

DEFAULT_MODELS = ("plain20", "plain56", "resnet20", "resnet56")
CSV_COLUMNS = ("model", "phase", "step", "kind", "index", "name", "grad_norm")


@dataclass
class GradientResult:
    """What :func:`gradient_flow` returns."""

    out_dir: Path
    rows: list[dict[str, Any]]  # the CSV rows
    ratios: dict[str, dict[str, float]]  # model -> phase -> first/last block grad norm
    losses: dict[str, dict[str, float]]  # model -> phase -> probe-batch loss
    files: list[Path]


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The residual (or plain) blocks in forward order."""
    if hasattr(model, "blocks"):
        return list(model.blocks())  # type: ignore[operator]
    from resnetlab.models import Block

    return [m for m in model.modules() if isinstance(m, Block)]


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[list[dict[str, Any]], float]:
    """Gradient norms of every conv weight and block output for one batch; and the loss.

    Works on a copy, so ``model`` (its BN running statistics, its ``.grad``) is left untouched.
    Returns rows ``{kind, index, name, grad_norm}`` (index 1 = nearest the input) and the loss.
    """
    probe = copy.deepcopy(model).train()
    block_grads: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(_blocks(probe)):
        def hook(_mod: nn.Module, _inp: Any, out: torch.Tensor, i: int = i) -> None:
            # out: [b, c, h, w]; dL/d(out) arrives in backward
            out.register_hook(lambda g: block_grads.__setitem__(i, g.detach().norm()))
        handles.append(block.register_forward_hook(hook))
    try:
        probe.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(probe(x), y)  # mean over the batch
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    rows: list[dict[str, Any]] = []
    convs = [(n, m) for n, m in probe.named_modules() if isinstance(m, nn.Conv2d)]
    for k, (name, conv) in enumerate(convs, start=1):
        rows.append({"kind": "conv", "index": k, "name": name,
                     "grad_norm": float(conv.weight.grad.norm()) if conv.weight.grad is not None else 0.0})
    names = {id(b): n for n, b in probe.named_modules()}
    for i, block in enumerate(_blocks(probe)):
        rows.append({"kind": "block", "index": i + 1, "name": names.get(id(block), f"block{i + 1}"),
                     "grad_norm": float(block_grads[i]) if i in block_grads else 0.0})
    return rows, float(loss.detach())


def gradient_flow(models: str | Sequence[str] = DEFAULT_MODELS, data: str = "digits", steps: int = 100,
                  overrides: Sequence[str] = (), seed: int = 0) -> GradientResult:
    """Measure gradient norms per depth for ``models`` at init and after ``steps`` steps.

    ``overrides`` (``key=value``) go on top of the data's recipe (see
    :data:`resnetlab.analysis.degradation.RECIPES`); ``run.root``/``run.name`` place the
    output folder (default ``runs/gradients-<data>-<time>/``).
    """
    from resnetlab.analysis.degradation import base_config
    from resnetlab.runtime import select_device

    names = args.models(models)
    args.check(gradient_steps=steps, seed=seed)
    base = base_config(data, overrides)
    device = select_device(base.train.device)
    # One intra-op thread on CPU unless train.threads says otherwise: these 8x8 convolutions are
    # too small to split, and on 2 busy cores two threads ran 5-7x slower than one.
    threads = base.train.threads or (1 if device.type == "cpu" else 0)
    with _torch_threads(threads):
        return _gradient_flow(names, data, steps, base, device, seed)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block (0: leave as is), then restore the caller's."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _gradient_flow(names: list[str], data: str, steps: int, base: Config, device: torch.device,
                   seed: int) -> GradientResult:
    from resnetlab.analysis.degradation import write_rows_csv
    from resnetlab.analysis.plots import plot_gradients
    from resnetlab.data import build_datasets, build_loader
    from resnetlab.models import build_model
    from resnetlab.runtime import seed_everything

    name = base.run.name or f"gradients-{data}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = Path(base.run.root).expanduser() / name
    out_dir.mkdir(parents=True, exist_ok=True)

    ds = build_datasets(base.data, seed=seed)
    loader = build_loader(ds.train, ds.meta, base.data, train=True, batch_size=base.train.batch_size,
                          device=device, seed=seed, channels_last=base.train.channels_last)
    if len(loader) == 0:
        raise AnalysisError(f"train.batch_size={base.train.batch_size} is larger than the training split")
    probe_x, probe_y = next(iter(loader.iterate(0)))  # [b, c, h, w], [b]: the same batch for all
    rows: list[dict[str, Any]] = []
    ratios: dict[str, dict[str, float]] = {}
    losses: dict[str, dict[str, float]] = {}
    for model_name in names:
        cfg = replace(base, model=replace(base.model, name=model_name), seed=seed)
        seed_everything(seed)  # the same init draw for every model of one depth
        model = build_model(cfg, ds.meta).to(device)
        if cfg.train.channels_last:  # as fit() trains it: NHWC is faster on CPU
            model = model.to(memory_format=torch.channels_last)

        phases = [("init", 0)]
        measured = {"init": measure(model, probe_x, probe_y)}
        if steps:
            _train_steps(model, loader, cfg.optim, steps, model_name)
            phases.append((f"after {steps} steps", steps))
            measured[phases[-1][0]] = measure(model, probe_x, probe_y)
        for phase, at_step in phases:
            layer_rows, loss_value = measured[phase]
            rows.extend({"model": model_name, "phase": phase, "step": at_step, **r} for r in layer_rows)
            blocks = [r["grad_norm"] for r in layer_rows if r["kind"] == "block"]
            ratios.setdefault(model_name, {})[phase] = (
                blocks[0] / blocks[-1] if blocks and blocks[-1] > 0 else float("nan"))
            losses.setdefault(model_name, {})[phase] = loss_value

    write_rows_csv(out_dir / "gradients.csv", rows, CSV_COLUMNS)
    files = [out_dir / "gradients.csv", *plot_gradients(rows, out_dir / "gradients.png", ("png", "svg"))]
    (out_dir / "summary.json").write_text(json.dumps({
        "data": data, "models": names, "steps": steps, "seed": seed, "batch_size": base.train.batch_size,
        "ratio_first_to_last_block": ratios, "probe_loss": losses,
        "note": "grad_norm: L2 norm of dL/dW (conv) or dL/d(block output) on one fixed probe batch, "
                "training-mode BN, mean cross-entropy loss",
    }, indent=2) + "\n")
    files.append(out_dir / "summary.json")
    return GradientResult(out_dir, rows, ratios, losses, files)


def _train_steps(model: nn.Module, loader: Any, optim_cfg: Any, steps: int, name: str) -> None:
    """``steps`` SGD steps of the recipe (its warm-up and schedule squeezed into ``steps``)."""
    from resnetlab.engine.loop import train_one_epoch
    from resnetlab.engine.metrics import SumMeter
    from resnetlab.engine.optim import build_optimizer, lr_at

    opt = build_optimizer(model, optim_cfg)
    meter = SumMeter(next(model.parameters()).device)
    bad: list[tuple[int, float]] = []

    def after_step(info: dict[str, Any]) -> bool:
        if not torch.isfinite(info["loss"]):  # a host read per step: fine for a few analysis steps
            bad.append((info["step"], float(info["loss"])))
            return True
        return info["step"] >= steps

    step, epoch = 0, 0
    while step < steps and not bad:
        out = train_one_epoch(model, loader, opt, nn.CrossEntropyLoss(), epoch=epoch, start_batch=0,
                              step=step, lr_fn=lambda s: lr_at(s, steps, len(loader), optim_cfg),
                              meter=meter, after_step=after_step)
        step, epoch = out["step"], epoch + 1
    if bad:
        raise AnalysisError(f"{name}: loss became {bad[0][1]} at step {bad[0][0]}; try a lower optim.lr=...")


def format_ratios(result: GradientResult) -> str:
    """One line per model: first-block / last-block output-gradient norm at each phase."""
    lines = []
    for model, by_phase in result.ratios.items():
        nblocks = max(r["index"] for r in result.rows if r["model"] == model and r["kind"] == "block")
        parts = [f"{v:.3g} {phase}" for phase, v in by_phase.items()]
        lines.append(f"{model}: gradient norm block 1 / block {nblocks} = " + ", ".join(parts))
    return "\n".join(lines)
