"""Case (e): peak memory and step time of very deep nets with and without grad checkpointing.

``model.grad_checkpointing=true`` runs the residual stages in checkpointed segments: each
segment keeps only its input for the backward pass and recomputes the rest. Three settings:

- ``without``: no checkpointing;
- ``with``: the defaults, segments of about sqrt(blocks per stage) (``model.recompute_every=0``)
  over all stages but the last (``model.recompute_stages=-1``); this row carries the targets;
- ``per_block``: one checkpoint per block over every stage (``checkpoint_every=1``,
  ``checkpoint_stages=null``), the classic layout (timm's), for comparison.

Each configuration trains in a fresh process (a process's peak memory never goes down, so one
process cannot measure two peaks):

- CUDA: ``torch.cuda.max_memory_allocated`` over one step after two warm-up steps (weights,
  gradients and optimiser state included; the first step has no momentum buffers yet).
- CPU: the peak of the bytes held by live tensors during one training step (a dispatch mode
  sees every tensor an operator creates and a finaliser sees it freed; recomputation in the
  backward pass included), plus the weights, gradients, momentum and batch alive throughout:
  the CPU counterpart of CUDA's number. The peak resident memory (``ru_maxrss``) minus the
  resident memory after the imports is reported beside it; it is larger and moves less, because
  glibc's allocator keeps freed heap memory and fragments it (measured: resnet110, batch 64,
  514 -> 139 MiB of live tensors but 901 -> 726 MiB of RSS).

Time is measured apart from memory, in one more process holding one model whose checkpointing
settings change between steps, cycling through the settings step by step (the order rotating
each round) after a warm-up step of each, so that all settings share the machine's load;
seconds per training step (forward, backward, SGD step), median of each setting's steps. The
machine's speed drifts over tens of seconds, so a time ratio is the median over rounds of the
ratio of steps taken side by side in one round (:func:`benchmarks.common.paired_ratio`).

    python -m benchmarks.bench_memory [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.common import (
    describe_machine,
    fmt_ratio,
    machine_info,
    met,
    paired_ratio,
    pick_device,
    run_worker,
    write_json,
)
from resnetlab.config import ModelConfig

TARGETS = {"memory": 0.5, "time": 1.35}  # with / without checkpointing, at most
_DEFAULTS = ModelConfig()  # "with" is whatever `model.grad_checkpointing=true` trains with
SETTINGS: dict[str, dict[str, Any] | None] = {  # name -> ResNet checkpoint attributes, None = off
    "without": None,
    "with": {"checkpoint_every": _DEFAULTS.recompute_every,
             "checkpoint_stages": _DEFAULTS.recompute_stages},
    "per_block": {"checkpoint_every": 1, "checkpoint_stages": None},
}


@dataclass(frozen=True)
class MemPlan:
    model: str
    batch: int
    steps: int  # timed steps per setting (alternating in one process)


PLANS: dict[tuple[str, bool], list[MemPlan]] = {
    ("cpu", True): [MemPlan("resnet110", 64, 2), MemPlan("resnet1202", 12, 1)],
    ("cpu", False): [MemPlan("resnet110", 128, 15), MemPlan("resnet1202", 16, 7)],
    ("cuda", True): [MemPlan("resnet110", 256, 10), MemPlan("resnet1202", 64, 5)],
    ("cuda", False): [MemPlan("resnet110", 512, 30), MemPlan("resnet1202", 128, 15)],
}


# ----------------------------------------------------------------------------------------------
# the worker: one configuration in a fresh process


class LiveTensorBytes:
    """Peak bytes of tensor storages created inside the ``with`` block and alive at once.

    A ``TorchDispatchMode`` sees every operator output; each new storage is counted until a
    ``weakref.finalize`` on it fires, i.e. until its memory is really released. Storages that
    existed before the block (weights, momentum) are not counted: add them yourself.
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    tracker._track(t)
                return out

        self.live = self.peak = 0
        self._keys: set[int] = set()
        self._mode = _Mode()

    def _track(self, t: Any) -> None:
        import torch

        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key, size = id(storage), storage.nbytes()
        if key in self._keys or size == 0:
            return
        self._keys.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._keys.discard(key)
        self.live -= size

    def __enter__(self) -> LiveTensorBytes:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this fresh process: ``spec['mode']`` is "memory" (one setting,
    ``spec['setting']``, a key of ``SETTINGS``) or "time" (every setting, in turn)."""
    import torch
    import torch.nn.functional as F

    from benchmarks.common import (
        autocast,
        peak_memory_after_warmup,
        peak_rss_bytes,
        reset_peak_rss,
        rss_bytes,
        sync,
    )
    from resnetlab.config import OptimConfig
    from resnetlab.engine.optim import build_optimizer
    from resnetlab.models import create_model

    device = torch.device(spec["device"])
    rss_imports = rss_bytes()  # torch and resnetlab loaded, nothing built yet
    reset_peak_rss()  # from here on, the high-water mark is this training's
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = create_model(spec["model"], num_classes=10)
    model = model.to(device).to(memory_format=torch.channels_last)  # as fit() trains
    opt = build_optimizer(model, OptimConfig(lr=0.01))
    x = torch.randn(spec["batch"], 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (spec["batch"],), device=device)
    amp = "bf16" if device.type == "cuda" else "none"

    def use(setting: str) -> None:
        attrs = SETTINGS[setting]
        model.set_grad_checkpointing(attrs is not None)
        for key, value in (attrs or {}).items():
            setattr(model, key, value)

    def step() -> float:
        """One training step; its seconds, the device's work included."""
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()
        sync(device)
        return time.perf_counter() - t0

    if spec["mode"] == "time":
        names = list(SETTINGS)
        times: dict[str, list[float]] = {name: [] for name in names}
        for i in range(-1, spec["steps"]):  # i == -1: warm-up of every setting, not timed
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                use(name)
                seconds = step()
                if i >= 0:
                    times[name].append(seconds)
        return times

    use(spec["setting"])
    out: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        # a later step's peak, optimiser state included (the first step has none yet)
        out["peak_bytes"] = peak_memory_after_warmup(step, device, warmup=2)
        return out
    step()  # warm-up: allocator and kernel caches settle; the RSS peak is the training's
    peak_rss = peak_rss_bytes()  # before the tracked step, whose bookkeeping costs memory too
    tensors = [*model.parameters(), *model.buffers(), x, y,
               *(p.grad for p in model.parameters() if p.grad is not None),
               *(v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))]
    resident = sum(t.untyped_storage().nbytes() for t in tensors)  # alive across the step
    with LiveTensorBytes() as live:
        step()
    out.update(peak_bytes=resident + live.peak, resident_tensor_bytes=resident,
               step_tensor_peak_bytes=live.peak, peak_rss_bytes=peak_rss - rss_imports,
               peak_rss_total_bytes=peak_rss, rss_imports_bytes=rss_imports)
    return out


# ----------------------------------------------------------------------------------------------


def measure(plan: MemPlan, device: str, timeout: float) -> dict[str, Any]:
    """Memory of each setting (a fresh process each) and their step times (one process)."""
    base = {"model": plan.model, "batch": plan.batch, "steps": plan.steps, "device": device}
    mem = {name: run_worker("benchmarks.bench_memory", {**base, "mode": "memory", "setting": name},
                            timeout=timeout) for name in SETTINGS}
    times = run_worker("benchmarks.bench_memory", {**base, "mode": "time"}, timeout=timeout)

    def summary(m: dict[str, Any], ts: list[float]) -> dict[str, Any]:
        out = {"peak_mib": m["peak_bytes"] / 2**20, "seconds_per_step": statistics.median(ts),
               "step_times": [round(t, 4) for t in ts]}
        for key in ("resident_tensor_bytes", "step_tensor_peak_bytes", "peak_rss_bytes",
                    "peak_rss_total_bytes", "rss_imports_bytes"):
            if key in m:
                out[key.replace("_bytes", "_mib")] = m[key] / 2**20
        return out

    rows = {name: summary(mem[name], times[name]) for name in SETTINGS}
    plain = rows["without"]
    row: dict[str, Any] = {**asdict(plan), "params": mem["without"]["params"], **rows,
                           "settings": {k: v for k, v in SETTINGS.items() if v is not None}}
    for name in SETTINGS:
        if name == "without":
            continue
        prefix = "" if name == "with" else f"{name}_"
        row[f"{prefix}memory_ratio"] = rows[name]["peak_mib"] / plain["peak_mib"]
        row[f"{prefix}time_ratio"] = paired_ratio(times[name], times["without"])
        if "peak_rss_mib" in plain:
            row[f"{prefix}memory_ratio_rss"] = rows[name]["peak_rss_mib"] / plain["peak_rss_mib"]
    return row


def run(quick: bool = False, device: str = "auto", write: bool = True) -> dict[str, Any]:
    """Case (e) for every model of the plan; writes ``results/e.json``."""
    dev = pick_device(device)
    machine = machine_info(dev)
    print(f"[bench_memory] {describe_machine(machine)}", flush=True)
    rows = []
    for plan in PLANS[("cuda" if dev.type == "cuda" else "cpu", quick)]:
        t0 = time.perf_counter()
        row = measure(plan, str(dev), timeout=1800)
        rows.append(row)
        print(f"[e] {plan.model} batch {plan.batch}: peak {row['without']['peak_mib']:.0f} -> "
              f"{row['with']['peak_mib']:.0f} MiB ({row['memory_ratio']:.2f}x), step "
              f"{row['without']['seconds_per_step']:.2f} -> {row['with']['seconds_per_step']:.2f} s "
              f"({row['time_ratio']:.2f}x); per block {row['per_block_memory_ratio']:.2f}x memory, "
              f"{row['per_block_time_ratio']:.2f}x time ({time.perf_counter() - t0:.0f}s)", flush=True)
    payload = {
        "case": "e", "title": "grad checkpointing: peak memory and step time, with / without",
        "machine": machine, "quick": quick,
        "memory_measure": "torch.cuda.max_memory_allocated" if dev.type == "cuda"
        else "peak bytes of live tensors in a training step (dispatch-mode tracker) plus the "
             "weights, gradients, momentum and batch; RSS above the imports beside it",
        "targets": TARGETS, "results": rows,
        "met": all(met(r["memory_ratio"], TARGETS["memory"], False)
                   and met(r["time_ratio"], TARGETS["time"], False) for r in rows),
    }
    if write:
        write_json("e", payload)
    return payload


def format_table(payload: dict[str, Any]) -> str:
    lines = [f"{'model':<12}{'batch':>6}{'MiB without':>13}{'MiB with':>10}{'mem ratio':>11}"
             f"{'s/step without':>16}{'s/step with':>13}{'time ratio':>12}"]
    for r in payload["results"]:
        lines.append(f"{r['model']:<12}{r['batch']:>6}{r['without']['peak_mib']:>13.0f}"
                     f"{r['with']['peak_mib']:>10.0f}{fmt_ratio(r['memory_ratio']):>11}"
                     f"{r['without']['seconds_per_step']:>16.3f}{r['with']['seconds_per_step']:>13.3f}"
                     f"{fmt_ratio(r['time_ratio']):>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller batches, fewer timed steps")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one configuration, JSON spec
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    print(format_table(run(args.quick, args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
