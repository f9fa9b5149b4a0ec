"""Shared pieces of the benchmarks: device choice, machine description, timing, memory, JSON.

Every benchmark measures its contenders *side by side in one process run*, alternating them in
rounds (A B, B A, A B, ...) so that a change in machine load during the run hits both alike, and
reports the median round with the spread. Nothing here knows about a particular case.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# device and machine


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def amp_for(device: torch.device) -> str:
    """The autocast mode a user would train with: bf16 on CUDA, none (float32) on CPU."""
    return "bf16" if device.type == "cuda" else "none"


def autocast(device: torch.device, amp: str) -> AbstractContextManager:
    """``torch.autocast`` for ``amp`` ("bf16"/"fp16"), or a no-op for "none"."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def load_average() -> float | None:
    """1-minute load average: above the core count, other work shared the CPU meanwhile."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


class OtherWork:
    """CPU time that processes outside this benchmark used while it ran, as a share of the
    machine's online CPUs over the run (Linux; ``None`` elsewhere).

    The machine's busy time comes from ``/proc/stat``; this process's own, and that of every
    child it (or a child) waited for, from ``getrusage``. The load average cannot tell the two
    apart and still counts work that ended before the run started.
    """

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        import resource

        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
        busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
        ours = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                     resource.getrusage(resource.RUSAGE_CHILDREN)))
        return busy, ours, time.monotonic()

    def share(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        others = (end[0] - self.start[0]) - (end[1] - self.start[1])
        cpus = os.cpu_count() or 1  # /proc/stat's first line sums every online CPU
        return round(max(0.0, others) / ((end[2] - self.start[2]) * cpus), 3)


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where a number was measured: CPU, cores, threads, library versions, the device."""
    import torchvision

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": str(device),
        "device_name": cpu_model(),
        "load_average_1min": load_average(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["gpus"] = torch.cuda.device_count()
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line: ``cpu (N cores), device name, torch x.y``."""
    dev = info["device"] if info["device"] == "cpu" else f"{info['device']} {info['device_name']}"
    return (f"{info['cpu']} ({info['cores']} cores, {info['torch_threads']} torch threads), "
            f"device {dev}, torch {info['torch']}, load avg {info['load_average_1min']}")


# ----------------------------------------------------------------------------------------------
# timing


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timings must include it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Window:
    """Seconds of a window of steps, with the device waited on at its two edges only.

    Synchronising inside the window (every step) would stall the CPU's run-ahead and penalise
    whichever contender queues work asynchronously; CUDA events would time the device alone and
    miss host-bound stalls. So: sync, start the clock, run the window, sync, stop the clock, for
    every contender alike.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.t0: float | None = None

    def start(self) -> None:
        sync(self.device)
        self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.t0 is None:
            raise RuntimeError("Window.stop() before start()")
        sync(self.device)
        seconds, self.t0 = time.perf_counter() - self.t0, None
        return seconds


def peak_memory_after_warmup(step: Callable[[], Any], device: torch.device, warmup: int = 1) -> int | None:
    """Peak bytes allocated on ``device`` during one training step *after* ``warmup`` steps.

    The first step has no optimiser state yet (momentum buffers appear in its ``opt.step``) and
    warms the allocator, so a peak taken over it reads low; the peak statistics are reset after
    the warm-up and read over a later step. None on devices without allocator statistics.
    """
    for _ in range(warmup):
        step()
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return int(torch.cuda.max_memory_allocated(device))


@dataclass
class Rounds:
    """Throughput of one contender over several timed rounds (images per second each)."""

    rates: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    def to_dict(self) -> dict[str, Any]:
        return {"images_per_s": self.median, "rounds": [round(r, 2) for r in self.rates],
                "min": min(self.rates), "max": max(self.rates)}


def alternate(contenders: dict[str, Callable[[], tuple[int, float]]], rounds: int) -> dict[str, Rounds]:
    """Call every contender once per round, reversing the order each round.

    A contender runs its own timed window and returns ``(images, seconds)``; warm-up is its
    own business (do it before). Alternating means neither side always runs right after the
    other, so slow drifts in machine load cancel instead of biasing one side.
    """
    names = list(contenders)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            images, seconds = contenders[name]()
            rates[name].append(images / max(seconds, 1e-12))
    return {n: Rounds(v) for n, v in rates.items()}


def paired_ratio(ours: list[float], reference: list[float]) -> float:
    """Median over rounds of ``ours[i] / reference[i]``, the two measured side by side in round
    ``i``. The machine's speed drifts over tens of seconds (a shared VM); a ratio taken within
    a round cancels the drift, where a ratio of two medians mixes rounds of different speeds."""
    if len(ours) != len(reference) or not ours:
        raise ValueError(f"paired_ratio needs equal, non-empty rounds, got {len(ours)} and {len(reference)}")
    return statistics.median(a / b for a, b in zip(ours, reference, strict=True))


def best_seconds(fn: Callable[[], Any], device: torch.device, *, warmup: int, reps: int) -> float:
    """Fastest of ``reps`` timed calls of ``fn`` after ``warmup`` untimed ones (peak speed)."""
    for _ in range(warmup):
        fn()
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_flops(device: torch.device, quick: bool) -> dict[str, Any]:
    """The machine's dense matrix-multiply speed, FLOP/s: the ceiling for (b).

    float32 on CPU, bf16 on CUDA (the dtypes the training runs in). Square matrices big enough
    to saturate the device; the best of several repetitions, as a peak should be.
    Returns ``{"n", "dtype", "flops_per_s", "seconds"}``.
    """
    if device.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 10 if quick else 30
    else:
        n, dtype, reps = 2048, torch.float32, 3 if quick else 8
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = best_seconds(lambda: torch.mm(a, b), device, warmup=2, reps=reps)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops_per_s": 2 * n**3 / seconds,
            "seconds": seconds}


# ----------------------------------------------------------------------------------------------
# memory


def rss_bytes() -> int:
    """Resident set size now (Linux /proc; falls back to the peak elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Restart the kernel's resident-memory high-water mark (Linux >= 4.0); False if impossible.

    Needed because ``ru_maxrss`` survives ``fork`` + ``exec``: a worker started by a big parent
    would report the parent's peak.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image (VmHWM; ``ru_maxrss`` where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS: bytes, Linux: KiB


def run_worker(module: str, spec: dict[str, Any], *, timeout: float,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m module --worker JSON`` in a fresh process; return its last stdout line
    parsed as JSON. A fresh process per measurement is what makes a peak-RSS number mean
    anything (the peak of a process never goes down)."""
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# results


def write_json(case: str, payload: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Write ``results_dir/<case>.json`` atomically (temp file + rename: never half a file)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{case}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_plain) + "\n")
    os.replace(tmp, path)
    return path


def _plain(obj: Any) -> Any:
    if isinstance(obj, (torch.device, torch.dtype, Path)):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def fmt_rate(x: float | None) -> str:
    """Images/s with sensible digits: 3 significant for small, integers for large."""
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def met(value: float | None, target: float, higher_is_better: bool) -> bool | None:
    """Whether ``value`` meets ``target`` (None when not measured)."""
    if value is None:
        return None
    return value >= target if higher_is_better else value <= target


def parse_list(text: str | None, default: Sequence[str]) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``; None -> ``default``."""
    return list(default) if not text else [t.strip() for t in text.split(",") if t.strip()]
