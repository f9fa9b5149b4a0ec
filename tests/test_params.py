"""Library errors name Python parameters; the CLI shows the flag that sets each (resnetlab.params)."""

from __future__ import annotations

import argparse

import pytest

from resnetlab.bounds import Bound, BoundError
from resnetlab.cli import build_parser
from resnetlab.params import flags_of, for_cli, mention, named, param_of


def test_named_error_keeps_param_and_reads_in_python_names():
    e = named(ValueError, "max_batch", "must be an integer from 1 to 4,096, got 0")
    assert isinstance(e, ValueError)
    assert str(e) == "max_batch must be an integer from 1 to 4,096, got 0"
    assert param_of(e) == "max_batch"
    assert param_of(ValueError("plain")) is None


def test_for_cli_writes_the_flag_of_the_command_that_ran():
    p = argparse.ArgumentParser()
    p.add_argument("-b", "--max-batch", type=int)
    p.add_argument("path", metavar="RUN")
    flags = flags_of(p)
    assert flags == {"max_batch": "--max-batch", "path": "RUN"}
    e = named(ValueError, "max_batch", "must be positive, got 0")
    assert for_cli(e, flags) == "--max-batch must be positive, got 0"
    # a parameter that no flag of this command sets keeps its Python name; other errors are untouched
    assert for_cli(named(ValueError, "grid", "is wrong"), flags) == "grid is wrong"
    assert for_cli(ValueError("no parameter"), flags) == "no parameter"


def test_bound_refuses_by_parameter_name():
    with pytest.raises(BoundError) as info:
        Bound("grid", 3, 201).check(100_000)
    assert str(info.value) == "grid must be an integer from 3 to 201, got 100000"
    assert param_of(info.value) == "grid"


def test_every_leaf_command_knows_its_flags():
    """Each command's parser records dest -> flag, so `main` can translate whatever it catches."""
    parser = build_parser()
    args = parser.parse_args(["reproduce", "landscape", "runs/x", "--grid", "5"])
    assert args._flags["grid"] == "--grid"
    args = parser.parse_args(["serve", "runs/x", "--max-batch", "4"])
    assert args._flags["max_batch"] == "--max-batch"


def _landscape_grid() -> None:
    from resnetlab.analysis.landscape import reproduce_landscape

    reproduce_landscape(grid=100_000)


def _transfer_ns() -> None:
    from resnetlab.analysis.transfer import run_transfer

    run_transfer("5,0")


def _cifar_configs_dir() -> None:
    from resnetlab.analysis.cifar_table import run_cifar_table

    run_cifar_table("20", "0", configs_dir="/no/such/folder")


def _fashion_overrides() -> None:
    from resnetlab.analysis.fashion_table import run_fashion_table

    run_fashion_table("resnet20", "0", overrides=["seed=3"])


# (library call, the same mistake at the command line, the message after the name: identical on both sides)
SAME_ERROR = [
    (_landscape_grid, ["reproduce", "landscape", "--grid", "100000"], "grid", "--grid",
     "must be an integer from 3 to 201"),
    # the flag --n fills run_transfer's `ns` (dest="ns"): the translation is exact
    (_transfer_ns, ["reproduce", "transfer", "--n", "5,0"], "ns", "--n", "must each be an integer from 1 to 100,000"),
    (_cifar_configs_dir, ["reproduce", "cifar-table", "--configs", "/no/such/folder"], "configs_dir", "--configs",
     "/no/such/folder has no cifar10_resnet20.yaml"),
    # a positional keeps its metavar: key=value words
    (_fashion_overrides, ["reproduce", "fashion-table", "--models", "resnet20", "seed=3"], "overrides", "key=value",
     "may not set seed ('seed=3')"),
]


@pytest.mark.parametrize(("call", "argv", "param", "flag", "detail"), SAME_ERROR, ids=[p for _, _, p, _, _ in SAME_ERROR])
def test_library_names_the_parameter_and_the_cli_the_flag(call, argv: list[str], param: str, flag: str,
                                                          detail: str, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from resnetlab.analysis import AnalysisError, degradation, fashion_table, transfer
    from resnetlab.cli import main

    def no_training(*_a: object, **_k: object) -> None:
        raise AssertionError("training started before the arguments were checked")

    for module in (degradation, transfer, fashion_table):
        monkeypatch.setattr(module, "run_trainings", no_training)
    with pytest.raises(AnalysisError) as info:
        call()
    assert str(info.value).startswith(f"{param} {detail}") and param_of(info.value) == param
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"resnetlab reproduce: error: {flag} {detail}"), err


def test_topk_below_one_names_the_flag_on_the_command_line(capsys, tmp_path):
    """predict and explain refuse --topk 0 before opening the run (the library says ``topk``)."""
    import torch

    from resnetlab.cli import main
    from resnetlab.inference import check_topk, top_classes

    with pytest.raises(ValueError) as info:
        check_topk(0)
    assert str(info.value) == "topk must be >= 1, got 0" and param_of(info.value) == "topk"
    values, ids = top_classes(torch.tensor([[0.1, 0.7, 0.2]]), 5)  # k is capped at the class count
    assert ids.tolist() == [[1, 2, 0]] and values[0].tolist() == pytest.approx([0.7, 0.2, 0.1])
    for command in ("predict", "explain"):
        assert main([command, str(tmp_path / "run"), str(tmp_path / "img.png"), "--topk", "0"]) != 0
        assert f"resnetlab {command}: error: --topk must be >= 1, got 0" in capsys.readouterr().err


# ---- the same error, said by the library (parameters) and by the command line (flags) ----------
# Each is refused before any weights are read or any model is built: milliseconds.


def _cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    from resnetlab.cli import main

    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_existing_output_advice_names_force_then_the_flag(tmp_path, capsys):
    from resnetlab.importers import import_torchvision
    from resnetlab.outputs import OutputError

    src, out = tmp_path / "w.pth", tmp_path / "w.resnetlab.pt"
    src.write_bytes(b"")
    out.write_bytes(b"already here")
    with pytest.raises(OutputError) as info:
        import_torchvision(src, "resnet18", output=out)
    assert "pass force=True to overwrite it" in str(info.value) and "--force" not in str(info.value)
    err = _cli_error(capsys, ["import", "torchvision", str(src), "--arch", "resnet18", "--output", str(out)])
    assert "pass --force to overwrite it" in err and "force=True" not in err
    assert out.read_bytes() == b"already here"  # nothing saved is touched


def test_unknown_arch_names_the_parameter_then_the_flag(tmp_path, capsys):
    from resnetlab.config import ConfigError
    from resnetlab.importers import import_torchvision

    src = tmp_path / "w.pth"
    with pytest.raises(ConfigError) as info:
        import_torchvision(src, "resnet19", output=tmp_path / "new.pt")
    assert str(info.value).startswith("arch names an unknown model, 'resnet19'; closest: ")
    assert param_of(info.value) == "arch"
    err = _cli_error(capsys, ["import", "torchvision", str(src), "--arch", "resnet19", "--output",
                              str(tmp_path / "new.pt")])
    assert "error: --arch names an unknown model, 'resnet19'" in err
    assert not (tmp_path / "new.pt").exists()


def test_quantize_calibration_names_the_parameter_then_the_flag(tmp_path, capsys):
    from resnetlab.quantize import QuantizeError, quantize_run

    with pytest.raises(QuantizeError, match=r"^calibration must be >= 1 image, got 0$"):
        quantize_run(tmp_path / "run", calibration=0)
    with pytest.raises(QuantizeError, match=r"^method must be one of static, dynamic, got 'qat'$"):
        quantize_run(tmp_path / "run", method="qat")
    err = _cli_error(capsys, ["quantize", str(tmp_path / "run"), "--calibration", "0"])
    assert err.endswith("error: --calibration must be >= 1 image, got 0")


def test_publish_into_a_full_folder_advises_force_then_the_flag(tmp_path, capsys):
    from resnetlab.weights import WeightsError
    from resnetlab.weights.publish import publish

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(WeightsError, match="pass force=True to overwrite its files"):
        publish(tmp_path / "run", out)
    err = _cli_error(capsys, ["publish", str(tmp_path / "run"), str(out)])
    assert "pass --force to overwrite its files" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_export_format_is_fmt_in_python_and_format_on_the_command_line(tmp_path):
    from resnetlab.config import ConfigError
    from resnetlab.export import export_model

    with pytest.raises(ConfigError) as info:
        export_model(tmp_path / "run", "gif")
    assert str(info.value).startswith("fmt must be one of safetensors, torchscript, onnx, got 'gif'")
    args = build_parser().parse_args(["export", "runs/x", "--format", "onnx"])
    assert args.fmt == "onnx" and args._flags["fmt"] == "--format"  # dest = export_model's parameter
    assert for_cli(info.value, args._flags).startswith("--format must be one of")


def test_mention_rewrites_a_parameter_inside_the_sentence():
    e = mention(ValueError, "x.onnx already exists; pass force=True to overwrite it", force="force=True")
    assert str(e) == "x.onnx already exists; pass force=True to overwrite it"
    assert for_cli(e, {"force": "--force"}) == "x.onnx already exists; pass --force to overwrite it"
    assert for_cli(e, {}) == str(e)  # a command without the flag keeps the Python spelling
