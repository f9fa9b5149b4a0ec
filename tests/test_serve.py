"""``resnetlab serve`` as a real server process on a free localhost port, and a real browser.

One server (module scope) answers every test; the last test stops it with SIGTERM while a request
is in flight. The browser test drives Debian's headless ``chromium`` over the DevTools protocol;
it fails (rather than skips) when chromium is missing and ``CI`` is set.

Two environment variables help by hand: ``RESNETLAB_SERVE_RUN=runs/<digits run>`` serves that
run instead of a 1-epoch one, and ``RESNETLAB_SCREENSHOT=docs/serve-page.png`` keeps the browser
test's screenshot there.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import resnetlab
from resnetlab.cli import main as cli_main
from resnetlab.config import load
from resnetlab.data import build_datasets

pytestmark = pytest.mark.slow

SERVER_FLAGS = ["--max-body-mb", "1", "--max-images", "4", "--max-pixels", "1000000",
                "--max-wait-ms", "20", "--threads", os.environ.get("RESNETLAB_TEST_THREADS", "1")]


# ---------------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: bytes | None = None, content_type: str | None = None,
         method: str | None = None, timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    """``(status, JSON body)`` of one request; HTTP errors are answers too."""
    req = urllib.request.Request(url, data=body, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """``multipart/form-data`` body with one ``file`` part per ``(filename, bytes)``."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for key, value in (fields or {}).items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    for name, data in files:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                  f"Content-Type: application/octet-stream\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A 1-epoch resnet20 on digits, or the run in ``RESNETLAB_SERVE_RUN``."""
    if os.environ.get("RESNETLAB_SERVE_RUN"):
        return Path(os.environ["RESNETLAB_SERVE_RUN"])
    root = tmp_path_factory.mktemp("runs")
    return resnetlab.train(None, [f"run.root={root}", "run.name=digits", "train.quiet=true",
                                  "train.tensorboard=false", "train.epochs=1"]).run_dir


@pytest.fixture(scope="module")
def digit_files(digits_run: Path, tmp_path_factory) -> list[Path]:
    """Six real test-split digits as 8x8 PNGs (the dataset's own pixels)."""
    cfg = load(digits_run / "config.yaml")
    test = build_datasets(cfg.data, seed=cfg.seed, needs=("test",)).test
    folder = tmp_path_factory.mktemp("digits")
    files = []
    for i in range(6):
        files.append(folder / f"digit{i}-label{int(test.labels[i])}.png")
        Image.fromarray(test.images[i, 0].numpy(), "L").save(files[-1])
    return files


@pytest.fixture(scope="module")
def server(digits_run: Path, tmp_path_factory) -> Server:
    """``resnetlab serve`` in its own process on a free port, ready (warm-up done)."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "resnetlab", "serve", str(digits_run),
                                 "--port", str(port), *SERVER_FLAGS], stdout=out, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}", port, proc, log)
    deadline = time.monotonic() + 180  # importing torch on a busy 2-core machine takes a while
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{srv.output()}")
        try:
            if http(srv.url + "/readyz", timeout=5)[0] == 200:
                break
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server not ready after 180 s:\n{srv.output()}")
        time.sleep(0.2)
    yield srv
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


# ---------------------------------------------------------------------------------------------- API


def test_model_health_and_ready(server: Server, digits_run: Path) -> None:
    assert http(server.url + "/healthz") == (200, {"status": "ok"})
    assert http(server.url + "/readyz") == (200, {"status": "ready"})
    status, info = http(server.url + "/v1/model")
    assert status == 200
    ckpt_file = Path(info["checkpoint"])
    assert ckpt_file.parent == digits_run / "checkpoints"
    assert info["checkpoint_sha256"] == hashlib.sha256(ckpt_file.read_bytes()).hexdigest()
    assert info["model"] == "resnet20" and info["classes"] == [str(d) for d in range(10)]
    assert info["in_chans"] == 1 and info["input_size"] == [8, 8] and len(info["mean"]) == 1
    assert info["parameters"] > 200_000 and info["ready"] is True


def test_predict_agrees_with_resnetlab_predict(server: Server, digits_run: Path, digit_files: list[Path],
                                               capsys) -> None:
    assert cli_main(["predict", str(digits_run), *map(str, digit_files), "--topk", "3", "--json"]) == 0
    want = {Path(p["file"]).name: p for p in json.loads(capsys.readouterr().out)["predictions"]}
    body, ctype = multipart([(f.name, f.read_bytes()) for f in digit_files[:4]])
    status, got = http(server.url + "/v1/predict?topk=3", body, ctype)
    assert status == 200 and got["model"] == "resnet20" and got["run"] == str(digits_run)
    assert [r["name"] for r in got["results"]] == [f.name for f in digit_files[:4]]
    raw = [http(server.url + "/v1/predict?topk=3", f.read_bytes(), "image/png")[1]["results"][0]
           for f in digit_files[4:]]  # the raw-body form, one image each
    for f, r in zip(digit_files, got["results"] + raw, strict=True):
        p = want[f.name]
        assert [t["label"] for t in r["top"]] == p["classes"] and [t["index"] for t in r["top"]] == p["indices"]
        # Same fused net and preprocessing; only the batch composition differs (float32
        # reductions in another order): differences are a few ulp of the logits.
        assert np.allclose([t["probability"] for t in r["top"]], p["probs"], atol=1e-5)


def test_explain_returns_overlay_for_top_or_requested_class(server: Server, digit_files: list[Path]) -> None:
    data = digit_files[0].read_bytes()
    status, top = http(server.url + "/v1/explain", data, "image/png")
    assert status == 200
    r = top["results"][0]
    assert r["target"]["index"] == r["top"][0]["index"] and len(r["top"]) == 5
    prefix = "data:image/png;base64,"
    assert r["overlay_png"].startswith(prefix)
    img = Image.open(io.BytesIO(base64.b64decode(r["overlay_png"][len(prefix):])))
    assert img.size == (224, 224) and img.mode == "RGB"  # over the 8x8 image as given: 8 px * 28
    net = Image.open(io.BytesIO(base64.b64decode(r["network_overlay_png"][len(prefix):])))
    assert net.size == (224, 224)  # the network's view: the same 8x8 here
    other = str((r["top"][0]["index"] + 1) % 10)
    body, ctype = multipart([("d.png", data)], {"target": other})
    status, forced = http(server.url + "/v1/explain", body, ctype)
    assert status == 200 and forced["results"][0]["target"]["label"] == other
    status, bad = http(server.url + "/v1/explain?target=eleven", data, "image/png")
    assert status == 400 and "target 'eleven'" in bad["error"]


def _bomb() -> bytes:
    """A 25-megapixel grey PNG of a few kB: tiny on the wire, 25 MB once decoded."""
    return png_bytes(Image.new("L", (5000, 5000)))


def _premultiplied_grey_alpha_tiff() -> bytes:
    """A real TIFF whose grey + alpha samples are marked premultiplied (ExtraSamples = 1, as
    some scanners and compositors write): PIL opens it as mode ``La`` and converts it to nothing
    but ``LA``, so preprocessing cannot make ``RGB`` or ``L`` of it."""
    out = io.BytesIO()
    Image.new("LA", (6, 5), (200, 128)).save(out, format="TIFF")  # ExtraSamples = 2: unassociated
    tag = b"\x52\x01\x03\x00\x01\x00\x00\x00"  # tag 338 ExtraSamples, SHORT, count 1 (little-endian)
    data = out.getvalue()
    assert data[:2] == b"II" and data.count(tag + b"\x02\x00") == 1
    data = data.replace(tag + b"\x02\x00", tag + b"\x01\x00")
    assert Image.open(io.BytesIO(data)).mode == "La"
    return data


BAD_INPUTS = {  # name: (body, content type, status, words the message must contain)
    "over the body limit": (b"\0" * (1_100_000), "image/png", 413, "(the server's max_body_mb)"),
    "not an image": (b"just some text, no pixels", "image/png", 415, "not an image"),
    "EPS named as PNG": (None, "image/png", 415, "supported format (PNG, JPEG, GIF, BMP, TIFF or WebP)"),
    "wrong content type": (b"{}", "application/json", 415, "application/json"),
    "unsupported mode": (None, "image/tiff", 415, "unsupported image mode La"),
    "empty body": (b"", "image/png", 400, "empty image"),
    "truncated": (None, "image/png", 400, "truncated"),
    "decompression bomb": (None, "image/png", 400, "decompression bomb"),
    "too many images": (None, None, 413, "(the server's max_images)"),
    "bad topk": (None, None, 400, "topk"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_status_and_reason(server: Server, digit_files: list[Path], case: str) -> None:
    body, ctype, want_status, words = BAD_INPUTS[case]
    url = server.url + "/v1/predict"
    good = digit_files[0].read_bytes()
    if case == "truncated":
        body = png_bytes(Image.fromarray(np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)))
        body = body[: len(body) // 2]
    elif case == "unsupported mode":
        body = _premultiplied_grey_alpha_tiff()
    elif case == "EPS named as PNG":  # Pillow's EPS plugin would hand this to Ghostscript
        out = io.BytesIO()
        Image.new("L", (8, 8)).save(out, format="EPS")
        body = out.getvalue()
    elif case == "decompression bomb":
        body = _bomb()
        assert len(body) < 100_000
    elif case == "too many images":
        body, ctype = multipart([(f"d{i}.png", good) for i in range(5)])
    elif case == "bad topk":
        body, url = good, url + "?topk=0"
        ctype = "image/png"
    status, answer = http(url, body, ctype)
    assert (status, answer["status"]) == (want_status, want_status), answer
    assert words in answer["error"], answer
    # ... and the server keeps answering others.
    assert http(server.url + "/v1/predict", good, "image/png")[0] == 200


def test_unknown_route_and_method_are_json(server: Server) -> None:
    assert http(server.url + "/v2/nothing") == (404, {"error": "Not Found", "status": 404})
    assert http(server.url + "/v1/predict")[0] == 405


def test_concurrent_requests_share_batches(server: Server, digit_files: list[Path]) -> None:
    before = http(server.url + "/v1/model")[1]["batching"]
    data = [f.read_bytes() for f in digit_files]

    def one(i: int) -> int:
        return http(server.url + "/v1/predict", data[i % len(data)], "image/png")[0]

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, range(48)))
    after = http(server.url + "/v1/model")[1]["batching"]
    assert statuses == [200] * 48
    assert after["images"] - before["images"] == 48
    # 16 clients at once with a 20 ms collection window: images share forward passes.
    assert after["batches"] - before["batches"] < 48


def test_page_and_its_files_are_served_locally(server: Server) -> None:
    with urllib.request.urlopen(server.url + "/") as r:
        html = r.read().decode()
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    assert 'id="file"' in html and 'id="pad"' in html and 'id="bars"' in html
    for name in ("app.js", "style.css"):
        with urllib.request.urlopen(f"{server.url}/static/{name}") as r:
            text = r.read().decode()
        assert "http://" not in text and "https://" not in text  # no CDN: works offline
    assert "http://" not in html and "https://" not in html


def test_serve_cli_refuses_a_missing_run_and_bad_flags_in_one_line(tmp_path: Path, capsys) -> None:
    assert cli_main(["serve", str(tmp_path / "no-such-run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("resnetlab serve: error:") and "no-such-run" in err and "\n" not in err
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["serve", str(tmp_path), "--max-batch", "0"])
    assert exit_info.value.code == 2 and "--max-batch: must be an integer from 1 to" in capsys.readouterr().err
    assert cli_main(["serve", str(tmp_path / "m.onnx"), "--backend", "onnxruntime"]) == 2
    assert f"{tmp_path / 'm.onnx'}: no such ONNX model file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- explain CLI


def test_explain_cli_writes_overlays_and_json(digits_run: Path, digit_files: list[Path], tmp_path: Path,
                                              capsys) -> None:
    out = tmp_path / "cams"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    code = cli_main(["explain", str(digits_run), *map(str, digit_files[:2]), str(bad), "--out", str(out),
                     "--target", "3", "--topk", "2"])
    captured = capsys.readouterr()
    assert code == 1 and f"{bad}" in captured.err  # the unreadable file is named, the rest explained
    summary = json.loads((out / "explain.json").read_text())
    assert [e["overlay"] for e in summary["explanations"]] == [f"{f.stem}.cam.png" for f in digit_files[:2]]
    assert all(e["target_class"] == "3" and len(e["probs"]) == 2 for e in summary["explanations"])
    assert Image.open(out / f"{digit_files[0].stem}.cam.png").size == (224, 224)
    assert cli_main(["explain", str(digits_run), str(digit_files[0]), "--target", "ten"]) == 2
    assert "target 'ten'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- v2, metrics


def _triton(server: Server):
    import tritonclient.http as triton

    return triton, triton.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=60.0)


def _text(cell: bytes | str) -> str:
    """A BYTES element as tritonclient returns it: bytes from binary data, str from JSON."""
    return cell.decode() if isinstance(cell, bytes) else cell


def _want(server: Server, files: list[Path]) -> tuple[np.ndarray, list[str]]:
    """``/v1/predict``'s probabilities ``[n, classes]`` (by class index) and top labels."""
    body, ctype = multipart([(f.name, f.read_bytes()) for f in files])
    status, got = http(server.url + "/v1/predict?topk=10", body, ctype)
    assert status == 200
    probs = np.zeros((len(files), 10), dtype=np.float32)
    for row, r in zip(probs, got["results"], strict=True):
        for t in r["top"]:
            row[t["index"]] = t["probability"]
    return probs, [r["top"][0]["label"] for r in got["results"]]


def test_v1_answer_says_how_each_image_was_preprocessed_and_batched(server: Server, digit_files: list[Path]) -> None:
    status, got = http(server.url + "/v1/predict", digit_files[0].read_bytes(), "image/png")
    r = got["results"][0]
    assert status == 200 and r["inverted"] is False  # the dataset's own pixels: light ink on dark
    assert "already at the input size" in r["preprocess"] and r["batch_size"] >= 1
    dark_on_light = png_bytes(Image.fromarray(255 - np.asarray(Image.open(digit_files[0]))).resize((64, 64)))
    r = http(server.url + "/v1/predict", dark_on_light, "image/png")[1]["results"][0]
    assert r["inverted"] is True and "ink box" in r["preprocess"] and "centred" in r["preprocess"]


def test_v2_health_and_metadata_through_tritonclient(server: Server, digits_run: Path) -> None:
    _, client = _triton(server)
    name = digits_run.name  # the run folder's name
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    assert client.is_model_ready(name, model_version="1") and not client.is_model_ready("nope")
    server_meta = client.get_server_metadata()
    assert server_meta["name"] == "resnetlab" and "binary_tensor_data" in server_meta["extensions"]
    meta = client.get_model_metadata(name)
    assert meta["name"] == name and meta["versions"] == ["1"] and meta["platform"] == "pytorch_libtorch"
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]},
                              {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]}]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [
        ("probabilities", "FP32", [-1, 10]), ("class_index", "INT64", [-1]), ("class_label", "BYTES", [-1])]
    assert http(server.url + "/v2/models/nope")[0] == 404
    assert http(server.url + f"/v2/models/{name}/versions/2")[0] == 404


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_v2_infer_from_tritonclient_equals_v1_and_the_predictor(server: Server, digits_run: Path,
                                                              digit_files: list[Path], binary: bool) -> None:
    triton, client = _triton(server)
    files = digit_files[:4]
    want, labels = _want(server, files)
    # Encoded images: raw bytes in binary mode; JSON carries them as base64 text.
    pngs = [f.read_bytes() for f in files]
    inp = triton.InferInput("image_bytes", [len(files)], "BYTES")
    inp.set_data_from_numpy(np.array(pngs if binary else [base64.b64encode(p) for p in pngs], dtype=object),
                            binary_data=binary)
    outs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "class_label", "class_index")]
    res = client.infer(digits_run.name, [inp], outputs=outs, request_id="req-7")
    assert res.get_response()["id"] == "req-7" and res.get_response()["model_name"] == digits_run.name
    # Same fused net and preprocessing; the batch composition may differ: a few ulp of the logits.
    assert np.allclose(res.as_numpy("probabilities"), want, atol=1e-5)
    assert [_text(b) for b in res.as_numpy("class_label")] == labels
    assert res.as_numpy("class_index").tolist() == [int(x) for x in labels]
    # An already preprocessed FP32 tensor (the predictor's own transforms), no outputs named:
    # tritonclient then asks for every output in binary.
    x = resnetlab.load(digits_run).transforms(list(files)).numpy()  # [4, 1, 8, 8] normalised
    assert x.shape == (4, 1, 8, 8)
    tensor = triton.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    res = client.infer(digits_run.name, [tensor], model_version="1")
    assert np.allclose(res.as_numpy("probabilities"), want, atol=1e-5)
    # Triton's classification extension: "probability:index:label", most probable first.
    top = client.infer(digits_run.name, [tensor], outputs=[
        triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)]).as_numpy("probabilities")
    assert top.shape == (4, 3)
    for row, p in zip(top, want, strict=True):
        fields = [_text(cell).split(":") for cell in row]
        assert [int(i) for _, i, _ in fields] == np.argsort(-p, kind="stable")[:3].tolist()
        assert all(abs(float(v) - p[int(i)]) < 1e-5 and lab == i for v, i, lab in fields)


def test_v2_infer_with_plain_httpx_json(server: Server, digits_run: Path, digit_files: list[Path]) -> None:
    import httpx

    want, labels = _want(server, digit_files[:2])
    predictor = resnetlab.load(digits_run)
    for row, p in zip(want, predictor.predict(digit_files[:2], topk=10), strict=True):  # in process
        assert np.allclose(row[p.indices], p.probs, atol=1e-5)
    x = predictor.transforms(digit_files[:2]).numpy()
    body = {"id": "plain", "inputs": [{"name": "images", "datatype": "FP32", "shape": list(x.shape),
                                       "data": x.tolist()}],  # nested lists are accepted too
            "outputs": [{"name": "class_label"}, {"name": "probabilities"}]}
    r = httpx.post(f"{server.url}/v2/models/{digits_run.name}/infer", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    got = r.json()
    assert got["id"] == "plain" and [o["name"] for o in got["outputs"]] == ["class_label", "probabilities"]
    assert got["outputs"][0]["data"] == labels
    assert np.allclose(np.array(got["outputs"][1]["data"]).reshape(2, 10), want, atol=1e-5)


def _v2_bad(case: str, png: bytes) -> tuple[str, dict[str, str], bytes | None, int, str]:
    """``(path suffix, headers, body, status, words)`` of one refused v2 request."""
    def doc(**inp: Any) -> bytes:
        base = {"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.0] * 64}
        return json.dumps({"inputs": [{**base, **inp}]}).encode()

    raw = struct.pack("<I", len(png)) + png
    head = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return {
        "unknown model": ("/v2/models/other/infer", {}, doc(), 404, "unknown model 'other'"),
        "not json": ("", {}, b"{nope", 400, "not valid JSON"),
        "no inputs": ("", {}, b'{"inputs": []}', 400, "exactly one input"),
        "wrong datatype": ("", {}, doc(datatype="INT32"), 400, "expected FP32"),
        "wrong shape": ("", {}, doc(shape=[1, 3, 8, 8]), 400, "expected [N, 1, 8, 8]"),
        "too little data": ("", {}, doc(data=[0.0] * 10), 400, "10 values"),
        "nan": ("", {}, doc(data=[float("nan")] * 64), 400, "NaN"),
        "unknown output": ("", {}, json.dumps({**json.loads(doc()), "outputs": [{"name": "x"}]}).encode(),
                           400, "unknown output 'x'"),
        "header length past body": ("", {"Inference-Header-Content-Length": "99999"}, head + raw, 400,
                                    "Inference-Header-Content-Length"),
        "binary size mismatch": ("", {"Inference-Header-Content-Length": str(len(head))}, head + raw[:-3],
                                 400, "binary_data_size"),
        "not an image": ("", {}, None, 415, "not an image"),  # built in the test
        "bad base64": ("", {}, json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                                       "data": ["%%%"]}]}).encode(), 400, "base64"),
        "too many images": ("", {}, doc(shape=[5, 1, 8, 8], data=[0.0] * 320), 413, "(the server's max_images)"),
    }[case]


V2_BAD = ["unknown model", "not json", "no inputs", "wrong datatype", "wrong shape", "too little data", "nan",
          "unknown output", "header length past body", "binary size mismatch", "not an image", "bad base64",
          "too many images"]


@pytest.mark.parametrize("case", V2_BAD)
def test_v2_bad_requests_get_4xx_and_the_reason(server: Server, digits_run: Path, digit_files: list[Path],
                                                case: str) -> None:
    import httpx

    png = digit_files[0].read_bytes()
    path, headers, body, want_status, words = _v2_bad(case, png)
    if case == "not an image":  # a well-formed binary BYTES request whose element is no image
        junk = b"just text"
        raw = struct.pack("<I", len(junk)) + junk
        head = json.dumps({"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                       "parameters": {"binary_data_size": len(raw)}}]}).encode()
        body, headers = head + raw, {"Inference-Header-Content-Length": str(len(head))}
    url = server.url + (path or f"/v2/models/{digits_run.name}/infer")
    r = httpx.post(url, content=body, headers=headers, timeout=60)
    assert r.status_code == want_status and words in r.json()["error"], r.text
    assert httpx.get(f"{server.url}/v2/models/{digits_run.name}/infer", timeout=60).status_code == 405
    assert http(server.url + "/v2/health/ready") == (200, {"ready": True})  # still serving


def test_metrics_are_prometheus_text_with_batches_and_latency(server: Server, digits_run: Path,
                                                              digit_files: list[Path]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    data = [f.read_bytes() for f in digit_files]
    with ThreadPoolExecutor(8) as pool:  # some traffic, concurrent so that batches form
        assert set(pool.map(lambda i: http(server.url + "/v1/predict", data[i % 6], "image/png")[0],
                            range(16))) == {200}
    assert http(server.url + "/v2/models/other/infer", b"{}", "application/json")[0] == 404
    with urllib.request.urlopen(server.url + "/metrics") as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=")  # Prometheus' text format
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert families["resnetlab_requests"].type == "counter"
    assert samples[("resnetlab_requests_total", (("method", "POST"), ("route", "/v1/predict"),
                                                  ("status", "200")))] >= 16
    assert any(k[0] == "resnetlab_requests_total" and ("route", "/v2/models/{name}/infer") in k[1]
               and ("status", "404") in k[1] for k in samples)  # route templates, not raw paths
    assert not any("/v2/models/other" in str(k) for k in samples)
    images = samples[("resnetlab_images_total", ())]
    assert samples[("resnetlab_batch_size_sum", ())] == images >= 16  # every image ran in one batch
    assert samples[("resnetlab_batch_size_count", ())] <= images
    assert samples[("resnetlab_queue_wait_seconds_count", ())] == images
    assert samples[("resnetlab_request_duration_seconds_count", (("route", "/v1/predict"),))] >= 16
    assert samples[("resnetlab_requests_in_flight", ())] >= 1  # this scrape itself
    assert samples[("resnetlab_model_load_seconds", ())] > 0 and samples[("resnetlab_images_per_second", ())] > 0
    sha = http(server.url + "/v1/model")[1]["checkpoint_sha256"]
    assert samples[("resnetlab_model_info", (("backend", "torch"), ("dataset", "digits"), ("model", "resnet20"),
                                             ("name", digits_run.name), ("sha256", sha)))] == 1
    stats = http(server.url + "/v1/stats")[1]  # what the page shows: the last minute
    assert stats["batches"] >= 1 and stats["images"] >= 16 and stats["mean_batch_size"] >= 1
    assert stats["latency_ms"]["p50"] > 0 and stats["latency_ms"]["p99"] >= stats["latency_ms"]["p50"]


# ---------------------------------------------------------------------------------------------- photos


def scans(images: torch.Tensor, labels: torch.Tensor, count: int = 12) -> list[tuple[Image.Image, int]]:
    """Photos and drawings of digits as people take them, made from the test split's own 8x8
    digits (upscaled, aspect kept): dark ink on white to grey paper, shaded, noisy, 20 to 55
    pixels tall on pages of 120 to 280 pixels, off centre."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        tall = int(rng.integers(20, 56))
        glyph = Image.fromarray(images[i, 0].numpy(), "L").resize((tall, tall), Image.Resampling.BICUBIC)
        ink = np.asarray(glyph, dtype=np.float64) / 255.0  # 0 paper .. 1 ink
        w, h = [(160, 160), (240, 160), (280, 280), (120, 200)][i % 4]
        paper = 255.0 - 25.0 * (i % 3) - np.linspace(0, 12, w)[None, :] * (i % 2)  # white to grey, shaded
        page = np.broadcast_to(paper, (h, w)).copy() + rng.normal(0, 3, (h, w))  # sensor noise
        x, y = int(rng.integers(4, w - tall - 4)), int(rng.integers(4, h - tall - 4))
        page[y : y + tall, x : x + tall] = page[y : y + tall, x : x + tall] * (1 - ink) + 20.0 * ink
        out.append((Image.fromarray(page.clip(0, 255).astype(np.uint8), "L"), int(labels[i])))
    return out


def test_scans_and_small_drawings_are_framed_as_the_dataset_was(server: Server, digits_run: Path,
                                                                tmp_path: Path, capsys) -> None:
    """12 photos: read right by the digits' own nearest neighbour once framed (crop to the ink,
    fit its height to the frame, centre); unframed, the digit is a blur of a pixel or two.

    The reader is 1-nearest-neighbour over the training split (98% on digits' test split): it
    measures the preprocessing itself, where the 1-epoch net of this module would measure its
    own training. ``predict`` and the server give the same answers and say what they did."""
    from resnetlab.predict import prepare_image

    cfg = load(digits_run / "config.yaml")
    data = build_datasets(cfg.data, seed=cfg.seed, needs=("train", "test"))
    train = data.train.images.flatten(1).float()  # [n, 64]
    items = scans(data.test.images, data.test.labels)

    def read(img: Image.Image, centre: bool) -> int:
        pixels, inverted, _ = prepare_image(img, data.meta, "auto", centre)
        assert inverted is True  # dark ink on paper
        return int(data.train.labels[(train - pixels.flatten().float()).pow(2).sum(dim=1).argmin()])

    framed = sum(read(img, True) == label for img, label in items)
    unframed = sum(read(img, False) == label for img, label in items)
    assert framed >= 11 and unframed <= 3, (framed, unframed)
    files = []
    for i, (img, label) in enumerate(items[:4]):
        files.append(tmp_path / f"scan{i}-label{label}.png")
        img.save(files[-1])
    assert cli_main(["predict", str(digits_run), *map(str, files), "--topk", "3", "--json"]) == 0
    want = json.loads(capsys.readouterr().out)["predictions"]
    assert cli_main(["predict", str(digits_run), *map(str, files), "--json", "--no-centre"]) == 0
    assert all(p["preprocess"] == "inverted; ink framing off" for p in json.loads(capsys.readouterr().out)["predictions"])
    body, ctype = multipart([(f.name, f.read_bytes()) for f in files])
    got = http(server.url + "/v1/predict?topk=3", body, ctype)[1]["results"]
    for p, r in zip(want, got, strict=True):
        assert p["inverted"] is True and "ink box" in p["preprocess"] and r["preprocess"] == p["preprocess"]
        assert [t["index"] for t in r["top"]] == p["indices"]
        assert np.allclose([t["probability"] for t in r["top"]], p["probs"], atol=1e-5)


# ---------------------------------------------------------------------------------------------- backends


@pytest.fixture(scope="module")
def onnx_file(digits_run: Path, tmp_path_factory) -> Path:
    """The run exported by ``resnetlab export --format onnx`` (outside the run folder)."""
    out = tmp_path_factory.mktemp("onnx") / "resnet20.onnx"
    assert cli_main(["export", str(digits_run), "--format", "onnx", "--output", str(out)]) == 0
    return out


def test_onnxruntime_backend_answers_as_torch_in_predict_and_serve(digits_run: Path, onnx_file: Path,
                                                                   digit_files: list[Path], capsys) -> None:
    from starlette.testclient import TestClient

    from resnetlab.export import TOLERANCE
    from resnetlab.serve.app import ServeApp, load_served_model
    from resnetlab.serve.backends import make_backend

    torch_b = make_backend(digits_run, "torch").load()
    ort_b = make_backend(digits_run, "onnxruntime", model_file=onnx_file).load()
    alone = make_backend(onnx_file, "onnxruntime").load()  # the .onnx by itself: its header has the meta
    assert alone.meta == torch_b.meta and alone.arch == "resnet20"
    images = [Image.open(f) for f in digit_files]
    x = torch.stack([ort_b.preprocess(im).x for im in images])  # the same preprocessing code
    assert torch.equal(x, torch.stack([torch_b.preprocess(im).x for im in images]))
    # export checked every logit to TOLERANCE; softmax moves no probability by more than that.
    assert (ort_b.predict_batch(x) - torch_b.predict_batch(x)).abs().max() <= TOLERANCE
    args = [str(digits_run), *map(str, digit_files), "--topk", "3", "--json"]
    assert cli_main(["predict", *args]) == 0
    want = json.loads(capsys.readouterr().out)["predictions"]
    assert cli_main(["predict", *args, "--backend", "onnxruntime", "--model-file", str(onnx_file)]) == 0
    got = json.loads(capsys.readouterr().out)["predictions"]
    for w, g in zip(want, got, strict=True):
        assert np.allclose(w["probs"], g["probs"], atol=TOLERANCE) and w["preprocess"] == g["preprocess"]
    served = load_served_model(digits_run, backend="onnxruntime", model_file=onnx_file, model_name="onnx-digits")
    with TestClient(ServeApp(served).build()) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/v2/models/onnx-digits").json()["platform"] == "onnxruntime_onnx"
        r = client.post("/v2/models/onnx-digits/infer", json={"inputs": [{
            "name": "images", "datatype": "FP32", "shape": list(x.shape), "data": x.flatten().tolist()}]})
        probs = np.array(r.json()["outputs"][0]["data"]).reshape(len(images), 10)
        assert np.allclose(probs, torch_b.predict_batch(x).numpy(), atol=TOLERANCE)
        explain = client.post("/v1/explain", content=digit_files[0].read_bytes(), headers={"content-type": "image/png"})
        assert explain.status_code == 501 and "serve with the torch backend" in explain.json()["error"]


def test_quantize_writes_an_int8_model_and_its_report(digits_run: Path, onnx_file: Path, tmp_path: Path) -> None:
    from resnetlab.quantize import format_report, quantize_run
    from resnetlab.serve.backends import make_backend

    out = tmp_path / "resnet20.int8.onnx"
    r = quantize_run(digits_run, "static", calibration=64, output=out, fp32_file=onnx_file, timing_s=0.02)
    saved = json.loads(out.with_name(out.name + ".json").read_text())
    assert saved["int8_bytes"] == out.stat().st_size and saved["calibration_images"] == 64
    # int8 weights take 1 byte instead of 4; per-channel scales and the graph add a few percent.
    assert r.size_ratio > 3.0
    assert set(r.latency_ms) == {"torch_fp32", "onnxruntime_fp32", "onnxruntime_int8"}
    assert all(v > 0 for engine in r.latency_ms.values() for v in engine.values())
    assert "smaller" in format_report(r)
    # The report's int8 top-1 is what the served int8 model gives on the test split.
    int8 = make_backend(digits_run, "onnxruntime", model_file=out).load()
    cfg = load(digits_run / "config.yaml")
    test = build_datasets(cfg.data, seed=cfg.seed, needs=("test",)).test
    from resnetlab.data import normalize

    pred = int8.predict_batch(normalize(test.images, int8.meta)).argmax(dim=1)
    assert int((pred == test.labels).sum()) == round(r.top1_int8 * len(test.labels) / 100.0)


# ---------------------------------------------------------------------------------------------- browser


class Chromium:
    """Headless chromium driven over the DevTools protocol (one page, one websocket)."""

    def __init__(self, binary: str, profile: Path, width: int = 1200, height: int = 900) -> None:
        import websocket

        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{binary} did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.ids = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.ids += 1
        self.ws.send(json.dumps({"id": self.ids, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.ids:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)  # console messages, exceptions, network requests

    def eval(self, expression: str) -> Any:
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"still false after {timeout} s: {expression}")

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def chromium_binary() -> str:
    """Debian's chromium; in CI its absence is a failure, elsewhere a skip."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; .ci/run installs it with apt-get (Debian package "
                    "'chromium'), and the browser test must run in CI")
    pytest.skip("chromium is not installed (apt-get install chromium); CI=true makes this a failure")


# What the page shows: the top class, the bars (label, probability, text, drawn length over
# the track's), and how colourful the heatmap is (share of
# pixels whose channels differ by over 60 of 255: grey pixels do not count).
READ_PAGE = """(async () => {
  const img = document.getElementById('overlay');
  await img.decode();
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext('2d');
  ctx.drawImage(img, 0, 0);
  const px = ctx.getImageData(0, 0, c.width, c.height).data;
  let coloured = 0;
  for (let i = 0; i < px.length; i += 4) {
    if (Math.max(px[i], px[i+1], px[i+2]) - Math.min(px[i], px[i+1], px[i+2]) > 60) coloured++;
  }
  return {
    state: document.body.dataset.state,
    status: document.getElementById('status').textContent,
    label: document.getElementById('prediction').dataset.label,
    bars: [...document.querySelectorAll('#bars li')].map(li => [li.dataset.label, +li.dataset.probability,
           li.querySelector('.pct').textContent,
           li.querySelector('.fill').getBoundingClientRect().width /
           li.querySelector('.track').getBoundingClientRect().width]),
    overlayWidth: img.naturalWidth,
    legend: !document.getElementById('legend').hidden &&
            document.querySelector('#legend .ramp').getBoundingClientRect().width > 50,
    header: document.getElementById('model').textContent,
    colouredShare: coloured / (c.width * c.height),
  };
})()"""


def test_browser_upload_shows_class_bars_and_heatmap(server: Server, digit_files: list[Path],
                                                     tmp_path: Path) -> None:
    browser = Chromium(chromium_binary(), tmp_path / "profile")
    try:
        browser.send("Runtime.enable")
        browser.send("Log.enable")
        browser.send("Network.enable")
        browser.send("Page.enable")
        browser.send("Page.navigate", url=server.url + "/")
        browser.wait_for("document.body && document.body.dataset.state === 'idle'")
        assert browser.eval("document.getElementById('draw').hidden") is False  # digits: 1 channel
        # Upload a real digit through the file input, as a person picking a file would.
        doc = browser.send("DOM.getDocument")["root"]["nodeId"]
        node = browser.send("DOM.querySelector", nodeId=doc, selector="#file")["nodeId"]
        browser.send("DOM.setFileInputFiles", nodeId=node, files=[str(digit_files[1])])
        browser.wait_for("['done', 'error'].includes(document.body.dataset.state)")
        page = browser.eval(READ_PAGE)
        assert page["state"] == "done", page["status"]
        api = http(server.url + "/v1/predict?topk=5", digit_files[1].read_bytes(), "image/png")[1]
        top = api["results"][0]["top"]
        assert page["label"] == top[0]["label"] and [b[0] for b in page["bars"]] == [t["label"] for t in top]
        assert np.allclose([b[1] for b in page["bars"]], [t["probability"] for t in top], atol=1e-5)
        for _, p, text, drawn_share in page["bars"]:  # the bar is as long as its probability
            assert text.endswith("%") and abs(drawn_share - p) < 0.02
        assert page["overlayWidth"] == 224 and page["colouredShare"] > 0.2  # a drawn heatmap
        assert page["legend"] and "10 classes (0, 1, 2, 3, …)" in page["header"]
        # The last minute's batching and latency, refreshed every 2 s from GET /v1/stats.
        browser.wait_for("document.getElementById('stats').textContent.includes('forward passes')")
        shot = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
        assert Image.open(io.BytesIO(shot)).size[0] == 1200
        if os.environ.get("RESNETLAB_SCREENSHOT"):
            Path(os.environ["RESNETLAB_SCREENSHOT"]).write_bytes(shot)

        # Draw a stroke on the pad with the mouse: predicted by itself after the debounce.
        box = browser.eval("(() => { const r = document.getElementById('pad').getBoundingClientRect();"
                           " return [r.left, r.top, r.width, r.height]; })()")
        x0, y0 = box[0] + box[2] * 0.5, box[1] + box[3] * 0.15
        browser.send("Input.dispatchMouseEvent", type="mousePressed", x=x0, y=y0, button="left", clickCount=1)
        for k in range(1, 11):
            browser.send("Input.dispatchMouseEvent", type="mouseMoved", x=x0, y=y0 + box[3] * 0.07 * k,
                         button="left", buttons=1)
        browser.send("Input.dispatchMouseEvent", type="mouseReleased", x=x0, y=y0 + box[3] * 0.7,
                     button="left", clickCount=1)
        browser.wait_for("document.body.dataset.state === 'done' && "
                         "document.getElementById('status').textContent.startsWith('drawing.png')")
        drawn = browser.eval(READ_PAGE)
        assert len(drawn["bars"]) == 5 and drawn["colouredShare"] > 0.2

        # Phone width: nothing sticks out sideways.
        browser.send("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=2,
                     mobile=True)
        assert browser.eval("document.documentElement.scrollWidth <= window.innerWidth")

        errors = [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"
                  or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
        assert not errors, errors
        urls = {e["params"]["request"]["url"] for e in browser.events
                if e.get("method") == "Network.requestWillBeSent"}
        assert urls and all(u.startswith((server.url, "data:", "blob:")) for u in urls), urls
    finally:
        browser.close()


# ---------------------------------------------------------------------------------------------- last: SIGTERM


def test_sigterm_finishes_the_request_in_flight_and_exits_0(server: Server, digits_run: Path,
                                                            digit_files: list[Path]) -> None:
    """Runs last in this module: it stops the shared server. A v1 and a v2 request are in flight."""
    data = digit_files[2].read_bytes()
    v2_body = json.dumps({"id": "late", "inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                                     "data": [base64.b64encode(data).decode()]}]}).encode()
    requests = [(f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                 f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data,
                (f"POST /v2/models/{digits_run.name}/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(v2_body)}\r\n"
                 "Connection: close\r\n\r\n").encode() + v2_body]
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=60) for _ in requests]
    try:
        for sock, req in zip(socks, requests, strict=True):
            sock.sendall(req[: len(req) - 40])  # in flight: the end of the body still to come
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the listener closes first: no new connections
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            except OSError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("still accepting connections 30 s after SIGTERM")
        assert server.proc.poll() is None  # ... but still finishing our requests
        replies = []
        for sock, req in zip(socks, requests, strict=True):
            sock.sendall(req[len(req) - 40 :])
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            replies.append(reply)
    finally:
        for sock in socks:
            sock.close()
    answers = []
    for reply in replies:
        status_line, _, rest = reply.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 200"), reply[:300]
        answers.append(json.loads(rest.split(b"\r\n\r\n", 1)[1]))
    assert answers[0]["results"][0]["top"][0]["label"] in [str(d) for d in range(10)]
    assert answers[1]["id"] == "late" and answers[1]["outputs"][2]["data"][0] == answers[0]["results"][0]["top"][0]["label"]
    assert server.proc.wait(timeout=60) == 0, server.output()
    assert "stopped (SIGTERM)" in server.output()
