"""Bad input on every surface: image formats, serve options and timeouts, reproduce arguments,
messages that say what a file is.

Every test here is fast (no training, no model loading beyond a tiny net): the slow server tests
live in test_serve.py.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from PIL import Image

from resnetlab.data.images import (
    FORMAT_NAMES,
    IMAGE_FORMATS,
    NOT_SUPPORTED,
    BadImageError,
    check_image,
    load_image,
    read_resized_crop,
)

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------- image formats

#: Formats Pillow can write here that are NOT on the allow-list (EPS: Pillow's own EPS writer;
#: opening one would go to the EPS plugin, which runs Ghostscript to decode).
OTHER_FORMATS = ("EPS", "TGA", "ICO", "SGI", "PCX", "DDS", "IM", "SPIDER", "JPEG2000", "PPM", "QOI",
                 "XBM", "MSP", "ICNS")


def _encoded(fmt: str, size: tuple[int, int] = (16, 16)) -> bytes:
    img = Image.new("RGB", size, (10, 200, 30))
    if fmt in ("XBM", "MSP"):
        img = img.convert("1")
    elif fmt == "SPIDER":
        img = img.convert("F")
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


@pytest.fixture
def plugin_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every Pillow opener outside the allow-list replaced by one that records its name and
    refuses: the list it returns stays empty while no other plugin even looks at a file."""
    Image.init()
    called: list[str] = []
    for fmt, (_factory, accept) in list(Image.OPEN.items()):
        if fmt in IMAGE_FORMATS:
            continue

        def spy(*_args: object, _fmt: str = fmt) -> object:
            called.append(_fmt)
            raise SyntaxError(f"{_fmt} plugin reached")

        def accept_spy(_prefix: bytes, _fmt: str = fmt) -> bool:
            called.append(_fmt)
            return False

        monkeypatch.setitem(Image.OPEN, fmt, (spy, accept_spy if accept else None))
    return called


def test_only_allowed_formats_are_decoded_by_content_not_name(tmp_path: Path, plugin_spy: list[str]) -> None:
    for fmt in OTHER_FORMATS:
        f = tmp_path / f"{fmt.lower()}-in-disguise.png"  # the name says PNG; the content decides
        f.write_bytes(_encoded(fmt))
        with pytest.raises(BadImageError) as info:
            load_image(f)
        assert str(info.value) == f"{f}: cannot read image ({NOT_SUPPORTED})"
        assert check_image(f) == f"cannot read image ({NOT_SUPPORTED})"
        with pytest.raises(BadImageError, match=re.escape(NOT_SUPPORTED)):
            read_resized_crop(f, 3, lambda h, w: (0, 0, h, w), (8, 8))
    assert plugin_spy == []


def test_the_allowed_formats_still_decode(tmp_path: Path, plugin_spy: list[str]) -> None:
    for fmt in IMAGE_FORMATS:
        f = tmp_path / f"img.{fmt.lower()}"
        f.write_bytes(_encoded(fmt))
        img = load_image(f)
        assert img.size == (16, 16)
        assert check_image(f) is None
    assert plugin_spy == []


def test_serve_refuses_other_formats_with_415_before_their_plugin(plugin_spy: list[str]) -> None:
    from resnetlab.serve.app import ApiError, decode_image

    for fmt in OTHER_FORMATS:
        with pytest.raises(ApiError) as info:
            decode_image(_encoded(fmt), "upload.png", 1_000_000)
        assert info.value.status == 415 and info.value.message == f"upload.png: {NOT_SUPPORTED}"
    assert plugin_spy == []
    assert decode_image(_encoded("PNG"), "ok.png", 1_000_000).size == (16, 16)


def test_readme_and_messages_name_exactly_the_allowed_formats() -> None:
    named = re.findall(r"\b(PNG|JPEG|GIF|BMP|TIFF|WebP)\b", FORMAT_NAMES)
    assert [n.upper() for n in named] == list(IMAGE_FORMATS)
    readme = (ROOT / "README.md").read_text()
    line = re.search(r"^- \*\*Image formats\*\*: (.*)$", readme, re.M)
    assert line, "README: the '- **Image formats**:' bullet is missing"
    assert f"{FORMAT_NAMES}, decided by content" in line.group(1)


# ---------------------------------------------------------------------------------------------- serve


def test_over_limit_image_on_a_folder_run_is_400_like_other_limits() -> None:
    from resnetlab.data import DataMeta
    from resnetlab.serve.app import ApiError, decode_and_prepare
    from resnetlab.serve.backends import Backend

    # preprocessing needs only the run's data meta, not a loaded network
    backend = Backend("unused")
    backend.meta = DataMeta("folder", ("a", "b"), 3, (8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), resize=16)
    strip = _encoded("PNG", size=(200_000, 1))  # 0.2 Mpx, but 51 M pixels once resized to 16 high
    with pytest.raises(ApiError) as info:
        decode_and_prepare(strip, "strip.png", backend, 1_000_000)
    assert info.value.status == 400 and "strip.png: a 200000x1 image" in info.value.message
    assert decode_and_prepare(_encoded("PNG"), "ok.png", backend, 1_000_000).x.shape == (3, 8, 8)


@pytest.mark.parametrize(("flags", "words"), [
    (["--port", "70000"], "argument --port: must be an integer from 1 to 65,535"),
    (["--port", "-1"], "argument --port: must be an integer from 1"),
    (["--max-body-mb", "nan"], "argument --max-body-mb: must be a number > 0 and <= 1024"),
    (["--max-body-mb", "inf"], "argument --max-body-mb: must be a number > 0"),
    (["--max-wait-ms", "-0.5"], "argument --max-wait-ms: must be a number >= 0"),
    (["--max-pixels", "1e9"], "argument --max-pixels: must be an integer"),
    (["--threads", "0"], "argument --threads: must be an integer from 1"),
    (["--body-timeout-s", "0"], "argument --body-timeout-s: must be a number > 0"),
    (["--header-timeout-s", "nan"], "argument --header-timeout-s: must be a number > 0"),
    (["--keep-alive-s", "0"], "argument --keep-alive-s: must be an integer from 1"),
])
def test_serve_refuses_every_bad_option_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       flags: list[str], words: str) -> None:
    from resnetlab.cli import main as cli_main

    with pytest.raises(SystemExit) as info:
        cli_main(["serve", str(tmp_path / "no-such-run"), *flags])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and err.startswith("resnetlab serve: error: " + words), err


def test_serve_library_call_checks_options_before_the_run(tmp_path: Path) -> None:
    from resnetlab.serve import Limits, ServeOptionError, Timeouts, serve

    missing = tmp_path / "no-such-run"  # loading it would fail: the option must be refused first
    with pytest.raises(ServeOptionError, match=r"^max_body_mb must be a number > 0 .* got nan$"):
        serve(missing, limits=Limits(max_body_mb=float("nan")))
    with pytest.raises(ServeOptionError, match=r"^port must be an integer from 1 to 65,535 .* got 70000$"):
        serve(missing, port=70000)
    with pytest.raises(ServeOptionError, match="^body_s must be a number > 0"):
        serve(missing, timeouts=Timeouts(body_s=-1))
    with pytest.raises(ServeOptionError, match="^host must be an address"):
        serve(missing, host="")


# Slow clients, against the server configuration serve() uses (server_config), on loopback with
# deadlines of 0.5 s so the test takes about a second.
SHORT = 0.5


@pytest.fixture(scope="module")
def slow_client_server():
    import threading
    import time

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from resnetlab.serve.timeouts import Timeouts, server_config

    async def echo(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(len(await request.body())))

    app = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
    server = uvicorn.Server(server_config(app, "127.0.0.1", 0, Timeouts(header_s=SHORT, body_s=SHORT, keep_alive_s=1),
                                          log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "test server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield port
    server.should_exit = True
    thread.join(timeout=10)


def _read_until_closed(sock, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (s)."""
    import time

    t0 = time.monotonic()
    sock.settimeout(limit_s)
    data = b""
    while True:
        chunk = sock.recv(65536)  # socket.timeout (an OSError) fails the test: never closed
        if not chunk:
            return data, time.monotonic() - t0
        data += chunk


def test_clients_stalled_mid_body_get_408_and_are_disconnected(slow_client_server: int) -> None:
    import socket

    socks = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", slow_client_server), timeout=5)
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        socks.append(s)
    try:
        for s in socks:
            answer, waited = _read_until_closed(s, limit_s=5)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
            assert b"body_s deadline" in answer
            assert waited < SHORT + 3
    finally:
        for s in socks:
            s.close()
    # a client that sends at once is answered as before
    with socket.create_connection(("127.0.0.1", slow_client_server), timeout=5) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        answer, _ = _read_until_closed(s, limit_s=5)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"5")


def test_a_header_sent_a_byte_at_a_time_is_cut_off(slow_client_server: int) -> None:
    import socket
    import time

    head = b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", slow_client_server), timeout=5) as s:
        t0 = time.monotonic()
        closed_after = None
        for byte in head:  # 0.05 s a byte: 11 s for the whole head, were it allowed
            try:
                s.sendall(bytes([byte]))
            except OSError:  # reset by the server: it gave up on us
                closed_after = time.monotonic() - t0
                break
            s.settimeout(0.05)
            try:
                answer = s.recv(65536)
            except TimeoutError:
                continue
            closed_after = time.monotonic() - t0
            assert answer.startswith(b"HTTP/1.1 408") and b"header_s deadline" in answer, answer[:80]
            break
        assert closed_after is not None, "the slow header was never cut off"
        assert SHORT * 0.9 < closed_after < SHORT + 3


# ---------------------------------------------------------------------------------------------- reproduce


REPRODUCE_BAD = [  # (argv after `reproduce`, words of the one-line refusal)
    (["landscape", "--grid", "100000"], "--grid must be an integer from 3 to 201"),
    (["landscape", "--grid", "2"], "--grid must be an integer from 3 to 201"),
    (["landscape", "--span", "inf"], "--span must be a number > 0 and <= 100"),
    (["landscape", "--span", "nan"], "--span must be a number > 0"),
    (["landscape", "--images", "0"], "--images must be an integer from 1"),
    (["landscape", "--chunk", "0"], "--chunk must be an integer from 1"),
    (["landscape", "--hessian-iters", "-1"], "--hessian-iters must be an integer from 0 to 1,000"),
    (["landscape", "--models", ""], "--models must name at least one registered model"),
    (["landscape", "--models", "resnet20,nonet"], "--models names unknown model 'nonet'"),
    (["landscape", "--seed", "-1"], "--seed must be an integer from 0 to 18,446,744,073,709,551,615"),
    (["landscape", "--jobs", "0"], "--jobs must be an integer from 1 to 256"),
    (["landscape", "--epochs", "1000000000000"], "--epochs must be an integer from 1 to 10,000"),
    (["responses", "--jobs", "-1"], "--jobs must be an integer from 1 to 256"),
    (["responses", "--models", "resnet20,resnet20"], "--models names 'resnet20' twice"),
    (["responses", "--seed", "-1"], "--seed must be an integer from 0"),
    (["degradation", "--jobs", "0"], "--jobs must be an integer from 1 to 256"),
    (["degradation", "--epochs", "100000"], "--epochs must be an integer from 1 to 10,000"),
    (["degradation", "--seeds", "0,-1"], "--seeds must each be an integer from 0"),
    (["transfer", "--steps", "1000000000"], "--steps must be an integer from 1 to 100,000"),
    (["transfer", "--pretrain-epochs", "0"], "--pretrain-epochs must be an integer from 1"),
    (["transfer", "--jobs", "0"], "--jobs must be an integer from 1 to 256"),
    (["transfer", "--n", "100000"], "--n has 100000, more than the data gives: data.train_per_class=100000: class '5' has only"),
    (["transfer", "--n", "5,0"], "--n must each be an integer from 1 to 100,000"),
    (["cifar-table", "--estimate-steps", "0"], "--estimate-steps must be an integer from 1 to 1,000"),
    (["cifar-table", "--depths", "21"], "--depths has 21, which is not a depth of Table 6; choose from 20, 32"),
    (["degradation", "--depths", "20,20"], "--depths has a repeated value in 20,20"),
    # gradients (not an experiment of reproduce) shares the same checks
    (["gradients", "--steps", "-1"], "--steps must be an integer from 0 to 100,000"),
    (["gradients", "--models", "resnet20,resnet20"], "--models names 'resnet20' twice"),
]


@pytest.mark.parametrize(("argv", "words"), REPRODUCE_BAD, ids=[" ".join(a) for a, _ in REPRODUCE_BAD])
def test_reproduce_checks_every_argument_before_any_work(argv: list[str], words: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from resnetlab.analysis import degradation, transfer
    from resnetlab.cli import main as cli_main

    def no_training(*_a: object, **_k: object) -> None:
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(degradation, "run_trainings", no_training)
    monkeypatch.setattr(transfer, "run_trainings", no_training)
    command = [] if argv[0] == "gradients" else ["reproduce"]
    code = cli_main([*command, *argv, f"run.root={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err.startswith(f"resnetlab {(command or argv)[0]}: error: {words}"), err
    assert list(tmp_path.iterdir()) == []  # no experiment folder left behind


def test_the_library_calls_check_the_same_way() -> None:
    from resnetlab.analysis import AnalysisError
    from resnetlab.analysis.landscape import reproduce_landscape, run_landscape
    from resnetlab.analysis.responses import reproduce_responses

    with pytest.raises(AnalysisError, match=r"^span must be a number > 0 and <= 100 .*got inf$"):
        reproduce_landscape(span=float("inf"))
    with pytest.raises(AnalysisError, match=r"^grid must be an integer"):
        run_landscape("no-such-run", grid=100_000)
    with pytest.raises(AnalysisError, match=r"^epochs must be an integer from 1 to 10,000 .*got 1000000000000.0$"):
        reproduce_responses(epochs=1e12)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- messages

TINY_TRAIN = ["train.epochs=1", "train.quiet=true", "train.tensorboard=false", "data.train_per_class=4",
              "train.batch_size=40", "train.test_at_end=false"]


@pytest.mark.parametrize("when", ["between steps", "while last.pt is written"])
def test_a_run_folder_deleted_mid_run_is_named_and_exits_1(when: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    import resnetlab.engine as engine
    from resnetlab import checkpoint as ckpt
    from resnetlab.cli import main as cli_main

    run_dir = tmp_path / "gone"
    fit = engine.fit

    def fit_and_delete(cfg, on_step=None):  # type: ignore[no-untyped-def]
        def step(info):  # type: ignore[no-untyped-def]
            if when == "between steps":
                shutil.rmtree(run_dir, ignore_errors=True)
            return on_step(info) if on_step else None

        return fit(cfg, on_step=step)

    def save_and_lose(state, path):  # type: ignore[no-untyped-def]
        # `rm -rf` while torch.save writes the temp file: the rename then fails on the temp file
        shutil.rmtree(run_dir)
        raise FileNotFoundError(2, "No such file or directory", str(Path(path).parent / ".last.pt.x1y2.tmp"))

    monkeypatch.setattr(engine, "fit", fit_and_delete)
    if when != "between steps":
        monkeypatch.setattr(ckpt, "save_checkpoint", save_and_lose)
    code = cli_main(["train", f"run.root={tmp_path}", "run.name=gone", *TINY_TRAIN])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1, err
    assert err.startswith(f"resnetlab train: error: {run_dir}: the run folder was deleted or moved while "
                          "training"), err
    assert ".tmp" not in err
    assert not run_dir.exists()  # not re-created as a stub holding only checkpoints/


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet20 on digits, one step of 40 images: a real run folder to predict with."""
    import resnetlab

    root = tmp_path_factory.mktemp("runs")
    return resnetlab.train(None, [f"run.root={root}", "run.name=tiny", *TINY_TRAIN]).run_dir


def test_predict_text_output_escapes_file_names(tiny_run: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from resnetlab.cli import main as cli_main

    forged = tmp_path / "a.png\nforged.png: 7 1.000 | 1 0.000"  # a name that prints a line of its own
    forged.write_bytes(_encoded("PNG", size=(8, 8)))
    plain = tmp_path / "b.png"
    plain.write_bytes(_encoded("PNG", size=(8, 8)))
    assert cli_main(["predict", str(tiny_run), str(forged), str(plain), "--topk", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and not any(line.startswith("forged.png") for line in lines), lines
    assert lines[0].startswith(str(tmp_path / "a.png\\nforged.png: 7 1.000 | 1 0.000") + ": ")
    # JSON keeps the name exactly (it escapes by itself)
    assert cli_main(["predict", str(tiny_run), str(forged), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["file"] == str(forged)


def test_predict_with_stdout_closed_exits_non_zero(tiny_run: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from resnetlab.cli import main as cli_main

    img = tmp_path / "b.png"
    img.write_bytes(_encoded("PNG", size=(8, 8)))
    monkeypatch.setattr(sys, "stdout", None)  # what Python sets when started with `>&-`
    assert cli_main(["predict", str(tiny_run), str(img)]) == 1
    assert "standard output is closed" in capsys.readouterr().err


def _onnx_model_bytes() -> bytes:
    """A real (tiny) ONNX model, serialised as `resnetlab export` writes one."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, producer_name="pytorch").SerializeToString()


CHECKPOINT_LOOKALIKES = {  # file name: (bytes, words the refusal must hold)
    "best.pt": (b"\x00garbage, no checkpoint here\n" * 4, "not a PyTorch checkpoint (neither a zip archive nor a pickle"),
    "model.onnx": (None, "an ONNX model, not a PyTorch checkpoint"),
    "exported.pt": (None, "an ONNX model, not a PyTorch checkpoint"),  # ONNX bytes under a .pt name
    "empty.pt": (b"", "an empty file (0 bytes)"),
    "cut.pt": (b"PK\x03\x04" + b"\x00" * 100, "a damaged zip archive"),
    "notes.pt": (None, "a zip archive, but not a PyTorch checkpoint"),
}


@pytest.mark.parametrize("name", list(CHECKPOINT_LOOKALIKES))
def test_a_file_that_is_no_checkpoint_is_called_what_it_is(name: str, tmp_path: Path) -> None:
    import zipfile

    from resnetlab.checkpoint import CheckpointError, load_checkpoint

    data, words = CHECKPOINT_LOOKALIKES[name]
    f = tmp_path / name
    if name in ("model.onnx", "exported.pt"):
        data = _onnx_model_bytes()
    if name == "notes.pt":
        with zipfile.ZipFile(f, "w") as z:
            z.writestr("notes.txt", "hello")
    else:
        f.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(f)
    message = str(info.value)
    assert message.startswith(f"{f}: {words}"), message
    assert "pickled" not in message and "could run code" not in message and "\n" not in message


def test_a_pickle_asking_for_code_is_still_refused_and_says_what_it_asked_for(tmp_path: Path) -> None:
    import os

    import torch

    from resnetlab.checkpoint import CheckpointError, load_checkpoint

    f = tmp_path / "evil.pt"
    torch.save({"f": os.system}, f)  # unpickling would import os.system
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(f)
    message = str(info.value)
    assert "which could run code" in message and "GLOBAL" in message and "system" in message
    assert "weights_only` set to `False`" not in message  # torch's advice to retry unsafely is dropped
