"""Serving's errors name Python parameters; `resnetlab serve` shows the flags that set them.

All of these are refused before a model loads or a port opens (the run does not exist), so
each takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from resnetlab.cli import build_parser
from resnetlab.cli import main as cli_main
from resnetlab.data import DataError
from resnetlab.params import for_cli, param_of
from resnetlab.serve import Limits, ServeOptionError, Timeouts, serve
from resnetlab.serve.app import check_model_name
from resnetlab.serve.backends import Backend, BackendError, make_backend
from resnetlab.serve.options import BOUNDS


def _serve_flags() -> dict[str, str]:
    return build_parser().parse_args(["serve", "RUN"])._flags


def test_every_bounded_parameter_is_the_dest_of_its_serve_flag() -> None:
    """BOUNDS speak serve()'s keywords; the parser's dests are the same names, so a library
    error translates to exactly the flag the user typed."""
    flags = _serve_flags()
    assert {p: flags[p] for p in BOUNDS} == {
        "port": "--port", "max_batch": "--max-batch", "max_wait_ms": "--max-wait-ms",
        "max_body_mb": "--max-body-mb", "max_images": "--max-images", "max_pixels": "--max-pixels",
        "threads": "--threads", "header_s": "--header-timeout-s", "body_s": "--body-timeout-s",
        "keep_alive_s": "--keep-alive-s"}
    assert flags["host"] == "--host" and flags["model_name"] == "--model-name" and flags["backend"] == "--backend"


@pytest.mark.parametrize(("call", "param", "flag"), [
    (lambda run: serve(run, timeouts=Timeouts(header_s=0)), "header_s", "--header-timeout-s"),
    (lambda run: serve(run, limits=Limits(max_images=0)), "max_images", "--max-images"),
    (lambda run: serve(run, max_batch=0), "max_batch", "--max-batch"),
    (lambda run: serve(run, log_level="loud"), "log_level", "--log-level"),
])
def test_serve_library_names_the_parameter_and_the_cli_the_flag(tmp_path: Path, call, param: str,
                                                                flag: str) -> None:
    with pytest.raises(ServeOptionError) as info:
        call(tmp_path / "no-such-run")
    message = str(info.value)
    assert param_of(info.value) == param and message.startswith(f"{param} must be ") and "--" not in message
    assert for_cli(info.value, _serve_flags()) == f"{flag} {message.removeprefix(f'{param} ')}"


@pytest.mark.parametrize(("argv", "words"), [
    (["--host", " "], "--host must be an address such as 127.0.0.1"),
    (["--model-name", "a/b"], "--model-name must be letters, digits"),
])
def test_serve_cli_prints_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                   words: str) -> None:
    assert cli_main(["serve", str(tmp_path / "no-such-run"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"resnetlab serve: error: {words}") and err.count("\n") == 1, err


def test_backend_errors_name_their_parameter() -> None:
    with pytest.raises(BackendError) as info:
        make_backend("runs/x", "tensorrt")
    assert str(info.value) == "backend must be one of torch, onnxruntime, got 'tensorrt'"
    assert for_cli(info.value, _serve_flags()).startswith("--backend must be one of")
    with pytest.raises(DataError, match=r"^invert must be one of auto, yes, no, got 'up'$"):
        Backend("runs/x", invert="up")  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"^model_name must be letters") as named_info:
        check_model_name("a b")
    assert param_of(named_info.value) == "model_name"
