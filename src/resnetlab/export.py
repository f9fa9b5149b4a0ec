"""``resnetlab export``: safetensors, TorchScript or ONNX, each checked against PyTorch before it is
written.

- ``onnx``: the fused network (BatchNorm folded into the convolutions) through the torch.export
  based exporter (``dynamo=True``) with a dynamic batch dimension; checked in onnxruntime at
  batch 1 and batch 3.
- ``torchscript``: the fused network, traced; checked by loading the serialised bytes back with
  ``torch.jit.load``.
- ``safetensors``: the unfused weights under their usual names (torchvision's for the ImageNet
  nets), with the config and data meta in the header; checked by loading them into a freshly
  built network. ``resnetlab eval/predict/export`` accept the file.

The reference is always the unfused eval-mode PyTorch network on seeded random inputs. Above
``tolerance`` (1e-4) nothing is written and :class:`ExportError` says by how much it missed.
Beside the model goes ``<output>.json``: architecture, classes, input size, mean/std, format,
version and the measured difference, all a consumer needs to preprocess images.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnetlab import checkpoint as ckpt
from resnetlab.calibration import apply_temperature, read_temperature
from resnetlab.config import Config, ConfigError
from resnetlab.data import DataMeta
from resnetlab.inference import build_inference_model, output_dir, read_checkpoint
from resnetlab.models import fuse_for_inference
from resnetlab.outputs import check_output, write_output
from resnetlab.params import named
from resnetlab.version import __version__

FORMATS: tuple[str, ...] = ("safetensors", "torchscript", "onnx")
EXTENSIONS = {"safetensors": ".safetensors", "torchscript": ".torchscript.pt", "onnx": ".onnx"}
TOLERANCE = 1e-4  # largest |exported - PyTorch| allowed on any logit
PARITY_BATCHES = (1, 3)  # batch 1 and an odd batch other than the traced one (2): dynamic batch
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ExportError(RuntimeError):
    """An export could not be made or failed its parity check; nothing was written."""


@dataclass
class ExportResult:
    """Where the export went and how closely it matches PyTorch."""

    path: Path  # the model file
    metadata_path: Path  # <path>.json
    format: str
    max_abs_diff: float  # largest |exported - PyTorch| over the parity batches
    metadata: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# the three formats: each returns the file's bytes and a runner that evaluates those bytes


Runner = Callable[[torch.Tensor], torch.Tensor]  # images [b, c, h, w] -> logits [b, k]


def _onnx(fused: nn.Module, example: torch.Tensor, meta: DataMeta) -> tuple[bytes, Runner]:
    try:
        import onnxruntime as ort
        import onnxscript  # noqa: F401  the dynamo exporter needs it; fail here with a clear hint
    except ImportError as e:
        raise ExportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({e}); "
                          "install them with: pip install 'resnetlab[export]'") from None
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # exporter chatter about deprecated internals
            program = torch.onnx.export(fused, (example,), dynamo=True, dynamic_shapes=({0: batch},),
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        verbose=False)
    except Exception as e:  # noqa: BLE001  the exporter raises many types; name the first line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {first}") from None
    proto = program.model_proto  # type: ignore[union-attr]  # dynamo export returns a program
    # Consumers of the .onnx alone still find the classes and the preprocessing.
    entry = proto.metadata_props.add()
    entry.key, entry.value = "resnetlab.meta", json.dumps(meta.to_dict())
    blob = proto.SerializeToString()
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])

    return blob, run


def _torchscript(fused: nn.Module, example: torch.Tensor) -> tuple[bytes, Runner]:
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit is deprecated upstream but still the format
            torch.jit.save(torch.jit.trace(fused, example), buf)
            loaded = torch.jit.load(io.BytesIO(buf.getvalue()), map_location="cpu")  # the bytes we write
    except Exception as e:  # noqa: BLE001
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ExportError(f"TorchScript tracing failed: {type(e).__name__}: {first}") from None
    loaded.eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return loaded(x)

    return buf.getvalue(), run


def _safetensors(model: nn.Module, cfg: Config, meta: DataMeta) -> tuple[bytes, Runner]:
    from safetensors.torch import load

    blob = ckpt.safetensors_bytes(model, ckpt.safetensors_header(cfg, meta.to_dict()))
    fresh = build_inference_model(load(blob), cfg, meta, source="exported safetensors")

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return fresh(x)

    return blob, run


# ----------------------------------------------------------------------------------------------


def parity(reference: nn.Module, run: Runner, inputs: list[torch.Tensor]) -> float:
    """Largest ``|run(x) - reference(x)|`` over ``inputs`` (inf if a shape differs or NaN shows)."""
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            want, got = reference(x).float(), run(x).float()
            if got.shape != want.shape:
                return math.inf
            diff = (got - want).abs().max().item()
            worst = max(worst, diff if math.isfinite(diff) else math.inf)
    return worst


def default_output(path: str | Path, cfg: Config, fmt: str) -> Path:
    """``<run folder or checkpoint folder>/<arch><ext>``, e.g. ``runs/r/resnet20.onnx``."""
    return output_dir(path) / f"{cfg.model.name}{EXTENSIONS[fmt]}"


def _output_paths(path: str | Path, output: str | Path | None, cfg: Config, fmt: str,
                  file: Path, force: bool) -> tuple[Path, Path]:
    """The model file and its ``.json``, both checked before any work (see outputs.py)."""
    if output is None:
        out = default_output(path, cfg, fmt)
    else:
        out = Path(output).expanduser()
        if out.is_dir():
            out = out / f"{cfg.model.name}{EXTENSIONS[fmt]}"
    meta_path = out.with_name(out.name + ".json")
    for p in (out, meta_path):
        check_output(p, force=force, sources=[file], what="export")
    return out, meta_path


def _metadata(fmt: str, out: Path, cfg: Config, meta: DataMeta, file: Path, diff: float,
              tolerance: float) -> dict[str, Any]:
    """``OUTPUT.json``: what a consumer needs to feed the model (preprocessing, input and output
    names and shapes) and how it was checked (``diff`` against PyTorch, within ``tolerance``)."""
    return {
        "format": fmt,
        "file": out.name,
        "arch": cfg.model.name,
        "num_classes": len(meta.classes),
        "in_chans": meta.in_chans,
        "classes": list(meta.classes),
        "input_size": list(meta.input_size),  # [h, w] pixels
        "resize": meta.resize,  # folder data: shorter side before the centre crop
        "mean": list(meta.mean),  # per channel, 0..1 scale: x = (pixels / 255 - mean) / std
        "std": list(meta.std),
        "data": meta.name,
        "input": {"name": INPUT_NAME, "shape": ["batch", meta.in_chans, *meta.input_size], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(meta.classes)], "meaning": "logits"},
        "batchnorm_folded": fmt != "safetensors",
        "resnetlab_version": __version__,
        "torch_version": torch.__version__,
        "source": str(file),
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "parity_batches": list(PARITY_BATCHES),
    }


def export_model(path: str | Path, fmt: str, output: str | Path | None = None, *,
                 tolerance: float = TOLERANCE, seed: int = 0, force: bool = False) -> ExportResult:
    """Export the network at ``path`` (run folder or checkpoint) as ``fmt``; see module doc.

    ``output`` is the model file (a folder: ``<arch><ext>`` inside it); default
    :func:`default_output`. Raises :class:`ExportError`, writing nothing, when the export's
    largest absolute difference from PyTorch exceeds ``tolerance``; an existing output (or its
    ``.json``) is refused unless ``force``, a run's checkpoint or the source always
    (:class:`~resnetlab.outputs.OutputError`).
    """
    if fmt not in FORMATS:
        raise named(ConfigError, "fmt", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    file, state, cfg, meta = read_checkpoint(path)
    out, meta_path = _output_paths(path, output, cfg, fmt, file, force)
    reference = build_inference_model(state, cfg, meta, source=str(file))  # unfused, eval, CPU
    temperature = read_temperature(path, file)  # `resnetlab calibrate`: the export gives logits / T
    if temperature is not None:
        apply_temperature(reference, temperature)
    reference.requires_grad_(False)
    c, (h, w) = meta.in_chans, meta.input_size
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(b, c, h, w, generator=gen) for b in PARITY_BATCHES]  # [b, c, h, w] ~ normalised images
    example = torch.randn(2, c, h, w, generator=gen)  # traced batch: not 1, so it stays dynamic

    if fmt == "safetensors":
        blob, run = _safetensors(reference, cfg, meta)
    else:
        fused = fuse_for_inference(reference)
        blob, run = _onnx(fused, example, meta) if fmt == "onnx" else _torchscript(fused, example)
    diff = parity(reference, run, inputs)
    if not diff <= tolerance:
        raise ExportError(
            f"{fmt} export of {file} fails its parity check: max |{fmt} - PyTorch| = {diff:.3g} "
            f"> {tolerance:.0e} on random inputs of batch {' and '.join(map(str, PARITY_BATCHES))}; "
            f"{out} was not written")

    metadata = _metadata(fmt, out, cfg, meta, file, diff, tolerance)
    write_output(out, lambda f: f.write(blob))
    text = json.dumps(metadata, indent=2)
    write_output(meta_path, lambda f: f.write(text.encode()))
    return ExportResult(out, meta_path, fmt, diff, metadata)


__all__ = ["EXTENSIONS", "FORMATS", "TOLERANCE", "ExportError", "ExportResult", "default_output",
           "export_model", "parity"]
