"""The Open Inference Protocol v2 (KServe, Triton, Seldon MLServer, TorchServe's KServe mode).

Parsing and encoding only; the routes live in :mod:`resnetlab.serve.app`. The model has two
alternative inputs and three outputs::

    images       FP32   [-1, C, H, W]  already preprocessed: normalised with the run's mean/std
    image_bytes  BYTES  [-1]           encoded images (PNG, JPEG, ...); decoded and preprocessed
                                       as POST /v1/predict does
    probabilities  FP32   [-1, classes]  softmax
    class_index    INT64  [-1]           the most probable class
    class_label    BYTES  [-1]           its name

A request sends exactly one input. Tensor data comes as JSON (``data``: flat or nested, row
major; BYTES elements as base64 strings, since JSON strings cannot hold raw image bytes) or by
Triton's binary tensor data extension: ``"parameters": {"binary_data_size": n}`` on the input,
the JSON header's length in the ``Inference-Header-Content-Length`` HTTP header, and the raw
little-endian bytes after the JSON, inputs in order (BYTES: each element a 4-byte little-endian
length, then its bytes). Outputs are returned as binary the same way when the request asks
(``"binary_data": true`` on a requested output, or ``"binary_data_output": true`` on the
request, which ``tritonclient`` sends when no output is named). Triton's classification
extension works too: ``"classification": k`` on ``probabilities`` returns BYTES ``[N, k]`` of
``"probability:index:label"``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from resnetlab.data import DataMeta
from resnetlab.serve.errors import ApiError
from resnetlab.serve.request import check_image_count
from resnetlab.version import __version__

INPUT_TENSOR, INPUT_BYTES = "images", "image_bytes"
OUTPUT_PROBS, OUTPUT_INDEX, OUTPUT_LABEL = "probabilities", "class_index", "class_label"
OUTPUTS = (OUTPUT_PROBS, OUTPUT_INDEX, OUTPUT_LABEL)
VERSION = "1"  # the one version served
HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ("binary_tensor_data", "classification")


def server_metadata() -> dict[str, Any]:
    """``GET /v2``."""
    return {"name": "resnetlab", "version": __version__, "extensions": list(EXTENSIONS)}


def model_metadata(name: str, platform: str, meta: DataMeta) -> dict[str, Any]:
    """``GET /v2/models/{name}``: inputs and outputs with their datatypes and shapes (-1: any)."""
    h, w = meta.input_size
    return {"name": name, "versions": [VERSION], "platform": platform,
            "inputs": [{"name": INPUT_TENSOR, "datatype": "FP32", "shape": [-1, meta.in_chans, h, w]},
                       {"name": INPUT_BYTES, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": OUTPUT_PROBS, "datatype": "FP32", "shape": [-1, meta.num_classes]},
                        {"name": OUTPUT_INDEX, "datatype": "INT64", "shape": [-1]},
                        {"name": OUTPUT_LABEL, "datatype": "BYTES", "shape": [-1]}],
            "parameters": {"classes": ",".join(meta.classes)[:4096],
                           "mean": ",".join(f"{m:g}" for m in meta.mean),
                           "std": ",".join(f"{s:g}" for s in meta.std)}}


@dataclass
class InferRequest:
    """A parsed ``/infer`` request: either a float tensor or encoded images."""

    id: str | None
    tensor: torch.Tensor | None = None  # float32 [N, C, H, W], normalised
    images: list[bytes] = field(default_factory=list)  # encoded images
    outputs: list[tuple[str, bool, int]] = field(default_factory=list)  # (name, binary, classification k)

    @property
    def count(self) -> int:
        return int(self.tensor.shape[0]) if self.tensor is not None else len(self.images)


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def _shape(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise _bad(f"{where}: 'shape' must be a list of non-negative integers, got {json.dumps(value)[:80]}")
    return value


def _flag(params: dict[str, Any], key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise _bad(f"{where}: parameter {key!r} must be true or false, got {json.dumps(value)[:40]}")
    return value


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """``(JSON header, binary tail)``; with no ``Inference-Header-Content-Length`` the whole
    body is JSON."""
    if header_length is None:
        head, tail = body, b""
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise _bad(f"Inference-Header-Content-Length {header_length!r}: expected the JSON header's "
                       f"size in bytes, at most the body's {len(body)}")
        n = int(header_length)
        head, tail = body[:n], body[n:]
    try:
        doc = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        hint = "" if header_length else " (binary tensor data needs the Inference-Header-Content-Length header)"
        raise _bad(f"request body is not valid JSON: {str(e)[:120]}{hint}") from None
    if not isinstance(doc, dict):
        raise _bad("request body must be a JSON object with an 'inputs' list")
    return doc, tail


def _bytes_elements(raw: bytes, where: str) -> list[bytes]:
    """Triton's binary BYTES: each element a 4-byte little-endian length, then the bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise _bad(f"{where}: binary BYTES data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise _bad(f"{where}: binary BYTES element of {n} bytes runs past the data's end")
        out.append(raw[pos : pos + n])
        pos += n
    return out


def _json_bytes(data: Any, where: str) -> list[bytes]:
    flat = np.asarray(data, dtype=object).reshape(-1).tolist() if isinstance(data, list) else [data]
    out = []
    for i, item in enumerate(flat):
        if isinstance(item, dict) and isinstance(item.get("b64"), str):
            item = item["b64"]  # KServe v1's {"b64": ...} spelling
        if not isinstance(item, str):
            raise _bad(f"{where}: element {i} must be a base64 string of an encoded image")
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise _bad(f"{where}: element {i} is not base64 (JSON BYTES carry encoded images as "
                       "base64; or send them as binary data)") from None
    return out


def _request_header(doc: dict[str, Any]) -> tuple[str | None, bool]:
    """The request's ``id`` and its ``binary_data_output`` default."""
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise _bad(f"'id' must be a string, got {json.dumps(rid)[:40]}")
    params = doc.get("parameters", {}) or {}
    if not isinstance(params, dict):
        raise _bad("'parameters' must be an object")
    return rid, _flag(params, "binary_data_output", "request")


def _the_input(doc: dict[str, Any], meta: DataMeta) -> tuple[dict[str, Any], str]:
    """The request's one input (either tensor input, with its datatype checked) and its name."""
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise _bad(f"'inputs' must be a list of exactly one input: {INPUT_TENSOR!r} (FP32) or "
                   f"{INPUT_BYTES!r} (BYTES)")
    inp = inputs[0]
    name, dtype = inp.get("name"), inp.get("datatype")
    if name not in (INPUT_TENSOR, INPUT_BYTES):
        raise _bad(f"unknown input {name!r}: this model takes {INPUT_TENSOR!r} (FP32 [N, "
                   f"{meta.in_chans}, {meta.input_size[0]}, {meta.input_size[1]}]) or {INPUT_BYTES!r} (BYTES [N])")
    want = "FP32" if name == INPUT_TENSOR else "BYTES"
    if dtype != want:
        raise _bad(f"input {name!r}: datatype {dtype!r}, expected {want}")
    return inp, name


def _binary_data(inp: dict[str, Any], tail: bytes, where: str) -> bytes | None:
    """The input's binary tensor data (``tail``, its size as declared), or None for JSON ``data``."""
    iparams = inp.get("parameters", {}) or {}
    if not isinstance(iparams, dict):
        raise _bad(f"{where}: 'parameters' must be an object")
    size = iparams.get("binary_data_size")
    if size is None:
        if tail:
            raise _bad(f"{len(tail)} bytes follow the JSON header but no input declares binary_data_size")
        if "data" not in inp:
            raise _bad(f"{where}: no 'data' and no binary_data_size parameter")
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _bad(f"{where}: binary_data_size must be a non-negative integer")
    if size != len(tail):
        raise _bad(f"{where}: binary_data_size {size} but {len(tail)} bytes follow the JSON header "
                   "(check Inference-Header-Content-Length)")
    return tail


def _read_tensor(inp: dict[str, Any], raw: bytes | None, shape: list[int], meta: DataMeta,
                 where: str) -> torch.Tensor:
    """FP32 ``[N, C, H, W]`` (the model's input, normalised) from binary or JSON data; finite."""
    c, (h, w) = meta.in_chans, meta.input_size
    if len(shape) != 4 or shape[1:] != [c, h, w]:
        raise _bad(f"{where}: shape {shape}, expected [N, {c}, {h}, {w}] (the model's input, normalised)")
    count = math.prod(shape)
    if raw is not None:
        if len(raw) != 4 * count:
            raise _bad(f"{where}: {len(raw)} bytes of binary data for shape {shape}, expected {4 * count} "
                       "(FP32, little-endian)")
        arr = np.frombuffer(raw, dtype="<f4")
    else:
        try:
            arr = np.asarray(inp["data"], dtype=np.float32).reshape(-1)
        except (ValueError, TypeError):
            raise _bad(f"{where}: 'data' must be numbers (flat or nested, row major)") from None
        if arr.size != count:
            raise _bad(f"{where}: {arr.size} values in 'data' for shape {shape}, expected {count}")
    if not np.isfinite(arr).all():
        raise _bad(f"{where}: holds NaN or infinite values")
    return torch.from_numpy(arr.astype(np.float32).reshape(shape))


def _read_images(inp: dict[str, Any], raw: bytes | None, shape: list[int], where: str) -> list[bytes]:
    """The encoded images of a BYTES ``[N]`` or ``[N, 1]`` input, binary or base64 JSON."""
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise _bad(f"{where}: shape {shape}, expected [N] or [N, 1] (one encoded image each)")
    images = _bytes_elements(raw, where) if raw is not None else _json_bytes(inp["data"], where)
    if len(images) != (shape[0] if shape else 0):
        raise _bad(f"{where}: {len(images)} elements for shape {shape}")
    return images


def _wanted_outputs(doc: dict[str, Any], binary_default: bool, meta: DataMeta) -> list[tuple[str, bool, int]]:
    """``[(output name, binary, classification k)]``: every output unless the request names some."""
    wanted = doc.get("outputs")
    if wanted is None:
        return [(o, binary_default, 0) for o in OUTPUTS]
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise _bad("'outputs' must be a list of objects with a 'name'")
    outputs = []
    for o in wanted:
        oname, op = o.get("name"), o.get("parameters", {}) or {}
        if oname not in OUTPUTS:
            raise _bad(f"unknown output {oname!r}: this model has {', '.join(OUTPUTS)}")
        if not isinstance(op, dict):
            raise _bad(f"output {oname!r}: 'parameters' must be an object")
        binary = op.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise _bad(f"output {oname!r}: binary_data must be true or false")
        k = op.get("classification", 0)
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= meta.num_classes:
            raise _bad(f"output {oname!r}: classification must be an integer from 0 to "
                       f"{meta.num_classes}")
        if k and oname != OUTPUT_PROBS:
            raise _bad(f"output {oname!r}: classification applies to {OUTPUT_PROBS!r} only")
        outputs.append((oname, binary, k))
    return outputs


def parse_infer(doc: dict[str, Any], tail: bytes, meta: DataMeta, max_images: int) -> InferRequest:
    """Check and decode an inference request against the served model; 400 names the fault,
    413 more than ``max_images`` images."""
    rid, binary_default = _request_header(doc)
    inp, name = _the_input(doc, meta)
    where = f"input {name!r}"
    shape = _shape(inp.get("shape"), where)
    raw = _binary_data(inp, tail, where)
    req = InferRequest(rid)
    if name == INPUT_TENSOR:
        req.tensor = _read_tensor(inp, raw, shape, meta, where)
    else:
        req.images = _read_images(inp, raw, shape, where)
    n = shape[0] if shape else 0
    if n < 1:
        raise _bad(f"{where}: no images (batch dimension 0)")
    check_image_count(n, max_images)
    req.outputs = _wanted_outputs(doc, binary_default, meta)
    return req


def _tensor(name: str, datatype: str, shape: list[int], values: np.ndarray | list[bytes],
            binary: bool, chunks: list[bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if datatype == "BYTES":
        items = list(values)
        if binary:
            blob = b"".join(struct.pack("<I", len(b)) + b for b in items)
        else:
            out["data"] = [b.decode("utf-8") for b in items]
    else:
        arr = np.ascontiguousarray(values)
        if binary:
            blob = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        else:
            out["data"] = arr.reshape(-1).tolist()
    if binary:
        out["parameters"] = {"binary_data_size": len(blob)}
        chunks.append(blob)
    return out


def encode_infer(req: InferRequest, model_name: str, probs: torch.Tensor,
                 classes: tuple[str, ...]) -> tuple[bytes, dict[str, str]]:
    """``(body, headers)`` of the answer to ``req``; ``probs`` float32 ``[N, classes]``."""
    p = probs.float().numpy()
    top = p.argmax(axis=1).astype(np.int64)  # [N]
    n = p.shape[0]
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, binary, k in req.outputs:
        if name == OUTPUT_PROBS and k:
            order = np.argsort(-p, axis=1, kind="stable")[:, :k]  # [N, k], most probable first
            cells = [f"{p[i, j]:f}:{j}:{classes[j]}".encode() for i in range(n) for j in order[i]]
            outputs.append(_tensor(name, "BYTES", [n, k], cells, binary, chunks))
        elif name == OUTPUT_PROBS:
            outputs.append(_tensor(name, "FP32", [n, p.shape[1]], p.astype(np.float32), binary, chunks))
        elif name == OUTPUT_INDEX:
            outputs.append(_tensor(name, "INT64", [n], top, binary, chunks))
        else:
            outputs.append(_tensor(name, "BYTES", [n], [classes[i].encode() for i in top], binary, chunks))
    answer: dict[str, Any] = {"model_name": model_name, "model_version": VERSION, "outputs": outputs}
    if req.id is not None:
        answer["id"] = req.id
    head = json.dumps(answer).encode()
    if not chunks:
        return head, {"content-type": "application/json"}
    return head + b"".join(chunks), {"content-type": "application/octet-stream",
                                     "inference-header-content-length": str(len(head))}


__all__ = ["EXTENSIONS", "INPUT_BYTES", "INPUT_TENSOR", "OUTPUTS", "VERSION", "InferRequest", "encode_infer",
           "model_metadata", "parse_infer", "server_metadata", "split_body"]
