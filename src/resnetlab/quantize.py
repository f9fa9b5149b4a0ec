"""``resnetlab quantize``: int8 post-training quantization for CPU serving, with a report.

    resnetlab quantize runs/digits56                     # static, 256 calibration images
    resnetlab serve runs/digits56 --backend onnxruntime --model-file runs/digits56/resnet56.int8.onnx

onnxruntime's quantization tools on the ONNX graph ``resnetlab export`` writes (exported first
when it is missing): ``static`` calibrates activation ranges on ``--calibration`` training
images (preprocessed as evaluation does) and writes QDQ int8 convolutions with per-channel
weights, which onnxruntime fuses into int8 kernels; ``dynamic`` quantizes the weights only and
measures activation ranges per batch at run time (no calibration; convolutions run as
ConvInteger, usually slower). onnxruntime rather than torch.ao's PT2E flow: the result runs on
the onnxruntime backend ``resnetlab serve`` already has, and PT2E's x86 int8 kernels need the
Inductor compiler at run time.

The report (``<arch>.int8.onnx.json`` beside the model, and printed) compares fp32 and int8 on
the run's test split (top-1), file sizes, and latency at batch 1 and 64 against fp32 eager torch
(the fused network ``predict`` runs) and fp32 onnxruntime, all timed side by side in this process
with the same thread count.
"""

from __future__ import annotations

import functools
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resnetlab.data import DataError, DataMeta, normalize
from resnetlab.data.build import build_datasets
from resnetlab.data.datasets import ArraySplit, FileSplit, preprocess
from resnetlab.data.images import load_image
from resnetlab.inference import load_for_inference, output_dir, read_checkpoint
from resnetlab.outputs import check_output, write_output
from resnetlab.params import named

METHODS = ("static", "dynamic")
LATENCY_BATCHES = (1, 64)
INPUT, OUTPUT = "images", "logits"


class QuantizeError(DataError):
    """Quantization could not be done; nothing was written."""


@dataclass
class QuantizeReport:
    """What ``resnetlab quantize`` measured; written as JSON beside the int8 model."""

    run: str
    arch: str
    method: str
    calibration_images: int
    fp32_file: str
    int8_file: str
    fp32_bytes: int
    int8_bytes: int
    test_images: int
    top1_fp32: float  # percent, fp32 eager torch on the test split
    top1_int8: float  # percent, int8 onnxruntime
    top1_fp32_onnxruntime: float
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # engine -> batch -> median ms
    threads: int = 1
    onnxruntime: str = ""
    torch: str = ""

    @property
    def size_ratio(self) -> float:
        return self.fp32_bytes / max(1, self.int8_bytes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the derived ratios."""
        lat = self.latency_ms
        speed = {b: lat["torch_fp32"][b] / lat["onnxruntime_int8"][b] for b in lat.get("onnxruntime_int8", {})}
        return {**asdict(self), "top1_drop_points": self.top1_fp32 - self.top1_int8,
                "size_ratio": self.size_ratio, "speedup_vs_torch_fp32": speed}


def _split_images(split: ArraySplit | FileSplit, meta: DataMeta, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` (all: None) images of a split as uint8 ``[n, c, h, w]`` and labels ``[n]``."""
    count = len(split) if n is None else min(n, len(split))
    if isinstance(split, ArraySplit):
        images = split.images[:count]
        if images.shape[-2:] != torch.Size(meta.input_size):
            images = preprocess([_to_pil(im) for im in images], meta)
        return images, split.labels[:count]
    return preprocess([load_image(p) for p in split.paths[:count]], meta), split.labels[:count]


def _to_pil(x: torch.Tensor) -> Any:
    from torchvision.transforms.v2.functional import to_pil_image

    return to_pil_image(x)


def _median_ms(fn: Callable[[], object], min_time_s: float = 1.0, min_runs: int = 5) -> float:
    """Median wall time of ``fn`` in ms over at least ``min_runs`` runs and ``min_time_s``."""
    fn()  # warm-up: allocations, kernel selection
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return 1000.0 * statistics.median(times)


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _top1(logits_of: Callable[[np.ndarray], np.ndarray], x: np.ndarray, labels: np.ndarray,
          batch: int = 256) -> float:
    hits = 0
    for i in range(0, len(x), batch):
        hits += int((logits_of(x[i : i + batch]).argmax(axis=1) == labels[i : i + batch]).sum())
    return 100.0 * hits / max(1, len(x))


class _Calibration:
    """onnxruntime's CalibrationDataReader: normalised training images in batches of 32."""

    def __init__(self, x: np.ndarray, batch: int = 32) -> None:
        self._batches: Iterator[np.ndarray] = iter([x[i : i + batch] for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        nxt = next(self._batches, None)
        return None if nxt is None else {INPUT: nxt}


def quantize_onnx(fp32: Path, calibration: np.ndarray, method: str = "static") -> bytes:
    """The int8 model (serialised) of the fp32 graph ``fp32``; ``calibration``: normalised float32
    images ``[n, c, h, w]`` for ``static`` (ignored by ``dynamic``)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32), str(prepped), skip_symbolic_shape=True)
        int8 = Path(tmp) / "int8.onnx"
        if method == "static":
            quantize_static(str(prepped), str(int8), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        else:
            quantize_dynamic(str(prepped), str(int8), per_channel=True, weight_type=QuantType.QInt8)
        return int8.read_bytes()


def time_engines(engines: dict[str, Callable[[np.ndarray], np.ndarray]], shape: tuple[int, ...],
                 batches: tuple[int, ...] = LATENCY_BATCHES, timing_s: float = 1.0) -> dict[str, dict[str, float]]:
    """Median ms per call of each engine at each batch size on random inputs ``[b, *shape]``,
    interleaved per batch size so that all see the same machine state."""
    latency: dict[str, dict[str, float]] = {name: {} for name in engines}
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.standard_normal((b, *shape)).astype(np.float32)
        for name, fn in engines.items():
            latency[name][str(b)] = _median_ms(functools.partial(fn, x), min_time_s=timing_s)
    return latency


def torch_engine(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """Eager torch logits of a float32 batch (channels_last, the fused network's layout)."""
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).numpy()

    return run


def onnx_engine(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """onnxruntime (CPU provider, ``threads`` intra-op threads) logits of a float32 batch."""
    session = _session(path, threads)
    return lambda x: session.run([OUTPUT], {INPUT: x})[0]


def _check_method(method: str, calibration: int) -> None:
    """Refuse an unknown ``method`` or fewer than one calibration image, naming the parameter."""
    if method not in METHODS:
        raise named(QuantizeError, "method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    if calibration < 1:
        raise named(QuantizeError, "calibration", f"must be >= 1 image, got {calibration}")


def _measure(path: str | Path, fp32: Path, int8: Path, meta: DataMeta, test: tuple[np.ndarray, np.ndarray],
             threads: int, timing_s: float) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """``(latency_ms, top1)`` per engine (PyTorch fp32, onnxruntime fp32 and int8) on ``threads``
    CPU threads; ``test``: the normalised test images [n, c, h, w] and their labels [n]."""
    model, _cfg, _meta = load_for_inference(path)
    engines = {"torch_fp32": torch_engine(model), "onnxruntime_fp32": onnx_engine(fp32, threads),
               "onnxruntime_int8": onnx_engine(int8, threads)}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        latency = time_engines(engines, (meta.in_chans, *meta.input_size), timing_s=timing_s)
        top1 = {name: _top1(fn, *test) for name, fn in engines.items()}
    finally:
        torch.set_num_threads(previous)
    return latency, top1


def quantize_run(path: str | Path, method: str = "static", calibration: int = 256,
                 output: str | Path | None = None, force: bool = False,
                 threads: int | None = None, overrides: list[str] | None = None,
                 fp32_file: str | Path | None = None, timing_s: float = 1.0) -> QuantizeReport:
    """Quantize the run at ``path`` to int8 and measure it (see the module docstring).

    Writes ``<run>/<arch>.int8.onnx`` (or ``output``) and its ``.json`` report; the fp32
    ``<run>/<arch>.onnx`` (or ``fp32_file``) is exported first when missing. ``overrides``:
    ``data.*`` changes to the stored config (e.g. ``data.root=...``) for reading the calibration
    and test images. ``timing_s``: seconds of timing per engine and batch size (at least 5 runs).
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise QuantizeError(f"quantize needs onnx, onnxscript and onnxruntime ({e}); install them with: "
                            "pip install 'resnetlab[export]'") from None
    from resnetlab.config import apply_overrides
    from resnetlab.export import default_output, export_model

    _check_method(method, calibration)
    threads = threads or torch.get_num_threads()
    file, _state, cfg, meta = read_checkpoint(path)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    fp32 = Path(fp32_file).expanduser() if fp32_file else default_output(path, cfg, "onnx")
    out = Path(output).expanduser() if output else output_dir(path) / f"{cfg.model.name}.int8.onnx"
    report_path = out.with_name(out.name + ".json")
    for p in (out, report_path):
        check_output(p, force=force, sources=[file, fp32], what="quantize")
    if not fp32.is_file():
        export_model(path, "onnx", fp32)  # checked against PyTorch before it is written

    data = build_datasets(cfg.data, seed=cfg.seed, needs=("train", "test"))
    if data.test is None:
        raise QuantizeError(f"{path}: the run's data has no test split to measure top-1 on")
    calib_u8, _ = _split_images(data.train, meta, calibration)
    test_u8, test_labels = _split_images(data.test, meta, None)
    calib = normalize(calib_u8, meta).numpy()  # [n, c, h, w] float32
    test_x, labels = normalize(test_u8, meta).numpy(), test_labels.numpy()

    blob = quantize_onnx(fp32, calib, method)
    write_output(out, lambda f: f.write(blob))

    latency, top1 = _measure(path, fp32, out, meta, (test_x, labels), threads, timing_s)
    report = QuantizeReport(
        run=str(path), arch=cfg.model.name, method=method,
        calibration_images=len(calib) if method == "static" else 0,
        fp32_file=str(fp32), int8_file=str(out), fp32_bytes=fp32.stat().st_size, int8_bytes=out.stat().st_size,
        test_images=len(labels), top1_fp32=top1["torch_fp32"], top1_int8=top1["onnxruntime_int8"],
        top1_fp32_onnxruntime=top1["onnxruntime_fp32"], latency_ms=latency, threads=threads,
        onnxruntime=ort.__version__, torch=torch.__version__)
    text = json.dumps(report.to_dict(), indent=2) + "\n"
    write_output(report_path, lambda f: f.write(text.encode()))
    return report


def format_report(r: QuantizeReport) -> str:
    """The table ``resnetlab quantize`` prints."""
    d = r.to_dict()
    lat = r.latency_ms
    lines = [f"{r.arch} int8 ({r.method}, {r.calibration_images} calibration images) -> {r.int8_file}",
             f"top-1 on {r.test_images} test images: fp32 {r.top1_fp32:.2f}%  int8 {r.top1_int8:.2f}%  "
             f"(drop {d['top1_drop_points']:+.2f} points; fp32 onnxruntime {r.top1_fp32_onnxruntime:.2f}%)",
             f"file: fp32 {r.fp32_bytes / 1e6:.2f} MB  int8 {r.int8_bytes / 1e6:.2f} MB  ({r.size_ratio:.2f}x smaller)",
             f"latency, median ms ({r.threads} thread{'s' if r.threads > 1 else ''}):"]
    for b in map(str, LATENCY_BATCHES):
        lines.append(f"  batch {b:>3}: torch fp32 {lat['torch_fp32'][b]:.2f}  onnxruntime fp32 "
                     f"{lat['onnxruntime_fp32'][b]:.2f}  onnxruntime int8 {lat['onnxruntime_int8'][b]:.2f}  "
                     f"({d['speedup_vs_torch_fp32'][b]:.2f}x vs torch fp32)")
    return "\n".join(lines)


__all__ = ["METHODS", "QuantizeError", "QuantizeReport", "format_report", "onnx_engine", "quantize_onnx",
           "quantize_run", "time_engines", "torch_engine"]
