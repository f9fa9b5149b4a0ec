"""Serving backends: what runs the network behind ``resnetlab serve`` and ``resnetlab predict``.

A backend is a small object with three hooks (LitServe's ``LitAPI`` shape: set-up, per-request
decoding, batched prediction), so the routes never know which one runs::

    b = make_backend("runs/digits", "onnxruntime"); b.load()
    item = b.preprocess(pil_image)          # PreparedImage: normalised float32 [c, h, w] + what was done
    probs = b.predict_batch(torch.stack([item.x]))   # float32 [n, classes], softmax, on the CPU

- ``torch``: the fused eval-mode network (:func:`resnetlab.inference.load_for_inference`).
- ``onnxruntime``: the ``.onnx`` file written by ``resnetlab export`` (or ``resnetlab quantize``)
  on onnxruntime's CPU provider. The run's checkpoint (or the file's own ``resnetlab.meta``
  header) gives classes and preprocessing, so both backends see identical inputs.

Preprocessing is shared (:func:`resnetlab.predict.prepare_image` then the run's normalisation):
only ``load`` and ``predict_batch`` differ.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import torch
from PIL import Image

from resnetlab.data import DataError, DataMeta, normalize
from resnetlab.params import named
from resnetlab.prepare import INVERT_CHOICES, Geometry, Invert, prepare_image_mapped
from resnetlab.weights import file_sha256  # noqa: F401  re-exported: serve's answers carry it

BackendName = Literal["torch", "onnxruntime"]
BACKENDS: tuple[str, ...] = get_args(BackendName)
ONNX_INPUT, ONNX_OUTPUT = "images", "logits"  # the names resnetlab export gives the graph


class BackendError(DataError):
    """A backend could not load its model: one line naming the file and what to do."""


@dataclass
class PreparedImage:
    """One image ready for :meth:`Backend.predict_batch`."""

    pixels: torch.Tensor  # uint8 [c, h, w], the network's view before normalisation
    x: torch.Tensor  # float32 [c, h, w], normalised with the training split's statistics
    inverted: bool | None  # grey runs: whether the polarity was flipped; None: colour run
    preprocess: str  # what was done, e.g. "inverted; ink box 40x52 at (12,8) fitted ..."
    source: Image.Image  # the decoded image as given (for drawing over it)
    geometry: Geometry  # where its pixels landed in the network's input


class Backend:
    """Base of the serving backends; subclasses implement :meth:`_load` and :meth:`predict_batch`.

    After :meth:`load`: ``meta`` (classes, input geometry), ``arch`` (network name), ``file``
    (the weights file served) and its ``sha256``, ``parameters`` and ``load_seconds``.
    """

    name: ClassVar[str] = ""
    platform: ClassVar[str] = ""  # the Open Inference Protocol's platform string
    explains: ClassVar[bool] = False  # has gradients for Grad-CAM (:meth:`cams`)
    # the loader itself refuses a non-finite forward pass (torch: resnetlab.inference.check_forward),
    # so load() does not run the same check a second time
    loader_checks_forward: ClassVar[bool] = False

    def __init__(self, source: str | Path, device: str = "cpu", model_file: str | Path | None = None,
                 invert: Invert = "auto", centre: bool = True, threads: int | None = None) -> None:
        if invert not in INVERT_CHOICES:
            raise named(DataError, "invert", f"must be one of {', '.join(INVERT_CHOICES)}, got {invert!r}")
        self.source = str(source)
        self.device = device
        self.model_file = Path(model_file).expanduser() if model_file else None
        self.invert: Invert = invert
        self.centre = centre
        self.threads = threads
        self.meta: DataMeta
        self.arch = ""
        self.file = Path()
        self.sha256 = ""
        self.parameters = 0
        self.load_seconds = 0.0

    # ------------------------------------------------------------------ the three hooks

    def load(self) -> Backend:
        """Load the model (once, before serving); returns ``self``. Errors name the file."""
        start = time.perf_counter()
        self._load()
        if not self.loader_checks_forward:
            self._check_finite()
        self.sha256 = file_sha256(self.file)
        self.load_seconds = time.perf_counter() - start
        return self

    def _check_finite(self) -> None:
        """Refuse a model whose outputs on a blank and a noise image are not finite (diverged
        weights): served, it would answer every request with a 500. Once per load: backends whose
        loader checks already (``loader_checks_forward``) skip it."""
        from resnetlab.inference import NonFiniteOutputError
        from resnetlab.runtime import probe_pixels

        x = normalize(probe_pixels(self.meta.in_chans, self.meta.input_size), self.meta)  # [2, c, h, w]
        probs = self.predict_batch(x)
        if not torch.isfinite(probs).all():
            raise NonFiniteOutputError(f"{self.file}: its outputs on a blank and a noise image are not finite "
                                       f"(NaN or inf): its weights diverged; use an earlier checkpoint")

    def preprocess(self, img: Image.Image) -> PreparedImage:
        """A decoded image (any mode and size) -> :class:`PreparedImage` (runs in a worker thread)."""
        pixels, inverted, steps, geometry = prepare_image_mapped(img, self.meta, self.invert, self.centre)
        return PreparedImage(pixels, normalize(pixels[None], self.meta)[0], inverted, steps, img, geometry)

    def predict_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float32 ``[n, c, h, w]`` -> softmax probabilities float32 ``[n, classes]`` (CPU)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optional

    def cams(self, pixels: torch.Tensor, targets: list[int]) -> torch.Tensor:
        """Grad-CAM maps ``[n, h, w]`` (0..1, the input's size) of uint8 ``[n, c, h, w]`` for one
        class each; only backends with gradients (``explains``) have them."""
        raise BackendError(f"Grad-CAM needs gradients: the {self.name} backend has none; "
                           "use the torch backend to explain")

    def _load(self) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/model`` reports about the backend."""
        return {"backend": self.name, "model_file": str(self.file), "load_seconds": self.load_seconds,
                "device": "cpu"}


class TorchBackend(Backend):
    """The fused PyTorch network (BatchNorm folded, channels_last) on ``device``."""

    name = "torch"
    platform = "pytorch_libtorch"
    explains = True
    loader_checks_forward = True  # load_for_inference -> check_forward

    def _load(self) -> None:
        from resnetlab.checkpoint import resolve
        from resnetlab.inference import load_for_inference

        if self.threads:
            torch.set_num_threads(self.threads)
        self.file = resolve(self.source)
        self.model, cfg, self.meta = load_for_inference(self.source, device=self.device)
        self.arch = cfg.model.name
        self.parameters = sum(p.numel() for p in self.model.parameters())

    @property
    def torch_device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": str(self.torch_device)}

    @torch.no_grad()
    def predict_batch(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.torch_device).contiguous(memory_format=torch.channels_last)  # the fused net's layout
        return self.model(x).float().softmax(dim=1).cpu()

    def cams(self, pixels: torch.Tensor, targets: list[int]) -> torch.Tensor:
        from resnetlab.explain import grad_cam

        return grad_cam(self.model, self.meta, pixels, targets)


class OnnxRuntimeBackend(Backend):
    """An exported ``.onnx`` graph on onnxruntime's CPU execution provider.

    ``source`` is a run folder or checkpoint (the model file defaults to ``<run>/<arch>.onnx``,
    where ``resnetlab export --format onnx`` writes it) or the ``.onnx`` file itself, whose
    ``resnetlab.meta`` header then gives classes and preprocessing. ``model_file`` picks another
    file, e.g. the int8 one ``resnetlab quantize`` writes.
    """

    name = "onnxruntime"
    platform = "onnxruntime_onnx"

    def _load(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise named(BackendError, "backend", f"onnxruntime needs the onnxruntime package ({e}); install "
                        "it with: pip install 'resnetlab[export]'") from None
        src = Path(self.source).expanduser()
        meta: DataMeta | None = None
        if src.suffix == ".onnx":
            file = self.model_file or src
        else:
            from resnetlab.inference import output_dir, read_checkpoint

            _ckpt, _state, cfg, meta = read_checkpoint(src)
            self.arch = cfg.model.name
            file = self.model_file or output_dir(src) / f"{cfg.model.name}.onnx"
        if not file.is_file():
            if self.model_file:
                raise named(BackendError, "model_file", f"{file}: no such ONNX model file")
            hint = ("" if src.suffix == ".onnx" else
                    "; export the run to ONNX first (`resnetlab export` with format onnx writes it "
                    "there), or name another model file")
            raise BackendError(f"{file}: no such ONNX model file{hint}")
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3  # errors only: no per-node chatter on stderr
        try:
            self.session = ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001  onnxruntime raises its own exception types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BackendError(f"{file}: onnxruntime cannot load it ({first[:300]})") from None
        header = self.session.get_modelmeta().custom_metadata_map
        if meta is None:
            if "resnetlab.meta" not in header:
                raise BackendError(f"{file}: no resnetlab.meta in its header; serve the run folder with "
                                   "this file as its model file, so the run gives classes and preprocessing")
            try:
                meta = DataMeta.from_dict(json.loads(header["resnetlab.meta"]))
            except (ValueError, TypeError) as e:
                raise BackendError(f"{file}: corrupt resnetlab.meta header ({e})") from None
            sidecar = file.with_name(file.name + ".json")
            arch = ""
            if sidecar.is_file():
                try:
                    arch = str(json.loads(sidecar.read_text()).get("arch", ""))
                except (ValueError, OSError):
                    arch = ""
            self.arch = arch or file.name.split(".")[0]
        self.meta, self.file = meta, file
        inputs = [i.name for i in self.session.get_inputs()]
        if inputs != [ONNX_INPUT]:
            raise BackendError(f"{file}: graph inputs {inputs}, expected [{ONNX_INPUT!r}] as "
                               "resnetlab export writes")
        self.parameters = self._count_parameters(file)

    @staticmethod
    def _count_parameters(file: Path) -> int:
        """Elements of the graph's initializers (weights, biases; int8 graphs: also their scales),
        0 when onnx is not installed."""
        try:
            import onnx
        except ImportError:
            return 0
        model = onnx.load(str(file), load_external_data=False)
        total = 0
        for t in model.graph.initializer:
            n = 1
            for d in t.dims:
                n *= int(d)
            total += n
        return total

    def predict_batch(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.session.run([ONNX_OUTPUT], {ONNX_INPUT: x.float().contiguous().numpy()})[0]
        return torch.from_numpy(logits).float().softmax(dim=1)


_CLASSES: dict[str, type[Backend]] = {"torch": TorchBackend, "onnxruntime": OnnxRuntimeBackend}


def make_backend(source: str | Path, backend: BackendName | str = "torch", **options: Any) -> Backend:
    """The backend named ``backend`` (a :data:`BackendName`; any other word is refused by name)
    for the model at ``source`` (not loaded yet: call ``load``)."""
    if backend not in _CLASSES:
        raise named(BackendError, "backend", f"must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return _CLASSES[backend](source, **options)


__all__ = ["BACKENDS", "Backend", "BackendName", "BackendError", "OnnxRuntimeBackend", "PreparedImage", "TorchBackend",
           "file_sha256", "make_backend"]
