"""Using a trained network: eval, predict, export (with parity checks), BN folding, torchvision import.

Everything runs on networks trained here on a tiny budget (one digits run and one image-folder
run of real PNG/JPEG files in RGB, L and RGBA, shared by the module) and on random torchvision
weights written to disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import resnetlab
from resnetlab.cli import main
from resnetlab.config import load
from resnetlab.data import build_datasets, normalize
from resnetlab.evaluate import evaluate_checkpoint
from resnetlab.export import ExportError, export_model
from resnetlab.importers import import_torchvision
from resnetlab.inference import load_for_inference
from resnetlab.models import create_model
from resnetlab.predict import predict

QUIET = ["train.quiet=true", "train.tensorboard=false", "train.epochs=1", "optim.schedule=constant",
         "optim.warmup=none"]
COLOURS = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}  # class -> RGB


# ---------------------------------------------------------------------------------------------- fixtures


def _image(colour: tuple[int, int, int], mode: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A noisy image of ``colour`` in PIL ``mode`` (RGB, L or RGBA), ``size`` = (w, h)."""
    w, h = size
    px = np.clip(np.array(colour) + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)  # [h, w, 3]
    img = Image.fromarray(px, "RGB")
    if mode == "L":
        return img.convert("L")
    if mode == "RGBA":
        alpha = rng.integers(128, 256, (h, w), dtype=np.uint8)  # partly transparent
        return Image.fromarray(np.dstack([px, alpha]), "RGBA")
    return img


# (file name, PIL mode, size (w, h)): PNG and JPEG in RGB, L and RGBA (JPEG has no alpha)
FILES = [("a.png", "RGB", (40, 52)), ("b.jpg", "L", (45, 38)), ("c.png", "RGBA", (37, 37)),
         ("d.jpeg", "RGB", (60, 41))]


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> Path:
    """root/{train,val,test}/<colour>/ with real image files: 4 per class in train, 2 per class
    in test, and 1/2/3 in val (unequal, so a mix-up of class ids shows in per-class counts)."""
    root = tmp_path_factory.mktemp("folder") / "colours"
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for i, (name, colour) in enumerate(COLOURS.items()):
            files = {"train": FILES, "val": FILES[: i + 1], "test": FILES[2:4]}[split]
            (root / split / name).mkdir(parents=True)
            for fname, mode, size in files:
                _image(colour, mode, size, rng).save(root / split / name / fname)
    return root


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A 1-epoch resnet20 on digits (8x8 grey)."""
    root = tmp_path_factory.mktemp("runs")
    return resnetlab.train(None, [f"run.root={root}", "run.name=digits", *QUIET]).run_dir


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, folder_root: Path) -> Path:
    """A 1-epoch resnet20 on the image folder at 32x32 (resize 36, centre crop 32)."""
    root = tmp_path_factory.mktemp("runs")
    return resnetlab.train(None, [
        f"run.root={root}", "run.name=folder", *QUIET, "data.name=folder", f"data.root={folder_root}",
        "data.image_size=32", "data.resize=36", "data.num_workers=0", "train.batch_size=4",
        "model.name=resnet20"]).run_dir


@pytest.fixture(scope="module")
def torchvision_weights(tmp_path_factory) -> tuple[Path, Path, nn.Module]:
    """Random torchvision resnet18 weights for the 3 colours saved with torch.save(state_dict),
    its class-names file (not in folder order), and the torchvision model itself."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=3).eval()
    with torch.no_grad():  # non-trivial BN statistics, so folding them is really exercised
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    folder = tmp_path_factory.mktemp("tv")
    torch.save(tv.state_dict(), folder / "resnet18-random.pth")
    (folder / "classes.txt").write_text("red\ngreen\n\nblue\n")
    return folder / "resnet18-random.pth", folder / "classes.txt", tv


@pytest.fixture(scope="module")
def imported(torchvision_weights, folder_root: Path) -> Path:
    """The torchvision weights as a resnetlab checkpoint, data.root pointing at the folder."""
    pth, classes, _ = torchvision_weights
    return import_torchvision(pth, "resnet18", classes, data_root=str(folder_root)).path


def _digits_input(batch: int) -> torch.Tensor:
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(batch))  # [b, 1, 8, 8]


# ---------------------------------------------------------------------------------------------- folding


def test_fused_matches_unfused_and_has_no_batchnorm(digits_run: Path) -> None:
    plain, _, _ = load_for_inference(digits_run, fuse=False)
    fused, _, meta = load_for_inference(digits_run)
    bns = [m for m in plain.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and any(not torch.allclose(m.running_var, torch.ones_like(m.running_var)) for m in bns)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert fused.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = _digits_input(16)
    with torch.no_grad():
        assert (fused(x) - plain(x)).abs().max().item() <= 1e-4
    assert meta.classes == tuple(str(i) for i in range(10))


# ---------------------------------------------------------------------------------------------- eval


def test_eval_writes_table_json_and_confusion_matrix(digits_run: Path, capsys) -> None:
    assert main(["eval", str(digits_run), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "top-1 error" in out and "top-5 error" in out and "accuracy" in out
    doc = json.loads((digits_run / "eval-test.json").read_text())
    cm = torch.tensor(json.loads((digits_run / "confusion-test.json").read_text())["matrix"])
    trained = json.loads((digits_run / "result.json").read_text())["test"]  # unfused, during training
    m = doc["metrics"]
    assert m["count"] == trained["count"] == int(cm.sum())
    assert m["top1_err"] == pytest.approx(trained["top1_err"], abs=100 / m["count"])  # <= one image
    assert m["loss"] == pytest.approx(trained["loss"], rel=1e-3)
    assert 100 * cm.trace().item() / m["count"] == pytest.approx(m["top1_acc"])
    assert [r["correct"] for r in doc["per_class"]] == cm.diagonal().tolist()
    assert [r["count"] for r in doc["per_class"]] == cm.sum(dim=1).tolist()
    assert (digits_run / "confusion-test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"class {digits_run.name}" not in out and out.count("%") >= 10 + 2  # a row per class


def test_eval_json_overrides_and_refused_override(digits_run: Path, capsys) -> None:
    assert main(["eval", str(digits_run), "--json"]) == 0
    default = json.loads(capsys.readouterr().out)["metrics"]
    assert main(["eval", str(digits_run / "checkpoints" / "last.pt"), "train.eval_batch_size=7", "--json"]) == 0
    small = json.loads(capsys.readouterr().out)["metrics"]  # batch size must not change results
    assert small["count"] == default["count"] == json.loads((digits_run / "result.json").read_text())["val"]["count"]
    assert small["top1_err"] == pytest.approx(default["top1_err"])
    assert small["loss"] == pytest.approx(default["loss"], rel=1e-5)
    assert (digits_run / "checkpoints" / "eval-val.json").is_file()  # beside the checkpoint file
    assert main(["eval", str(digits_run), "model.name=resnet56"]) == 2
    err = capsys.readouterr().err
    assert "data.*" in err and "Traceback" not in err


def test_eval_folder_run(folder_run: Path, folder_root: Path) -> None:
    report = evaluate_checkpoint(folder_run, "test")
    assert report.metrics["count"] == len(list((folder_root / "test").rglob("*.*")))
    assert report.classes == sorted(COLOURS)
    assert Path(report.files["confusion_png"]).parent == folder_run
    assert sum(map(sum, report.confusion)) == report.metrics["count"]


# ---------------------------------------------------------------------------------------------- predict


def test_predict_equals_the_network_on_dataset_pixels(digits_run: Path, tmp_path: Path) -> None:
    cfg = load(digits_run / "config.yaml")
    test = build_datasets(cfg.data, seed=cfg.seed).test
    images = test.images[:5]  # [5, 1, 8, 8] uint8, exactly what evaluation feeds
    for i, img in enumerate(images):
        Image.fromarray(img[0].numpy(), "L").save(tmp_path / f"digit{i}.png")
    (tmp_path / "digit5.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # unreadable
    result = predict(digits_run, [tmp_path], topk=3)
    assert [Path(p.file).name for p in result.predictions] == [f"digit{i}.png" for i in range(5)]
    assert [Path(f).name for f, _ in result.errors] == ["digit5.png"]
    model, _, meta = load_for_inference(digits_run, fuse=False)
    with torch.no_grad():
        want = model(normalize(images, meta)).softmax(dim=1)  # [5, 10]
    top = want.topk(3, dim=1)
    for p, probs, ids in zip(result.predictions, top.values, top.indices, strict=True):
        assert p.indices == ids.tolist() and p.classes == [meta.classes[i] for i in ids]
        assert np.allclose(p.probs, probs.numpy(), atol=1e-5)


def test_predict_cli_any_mode_and_unreadable_files(folder_run: Path, folder_root: Path, tmp_path: Path,
                                                    capsys) -> None:
    good = sorted((folder_root / "val").rglob("*.*"))  # PNG RGB/RGBA, JPEG L
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (tmp_path / "empty.png").touch()
    code = main(["predict", str(folder_run), str(folder_root / "val"), str(tmp_path / "broken.jpg"),
                 str(tmp_path / "empty.png"), "--topk", "2", "--json"])
    captured = capsys.readouterr()
    assert code == 1
    assert "broken.jpg" in captured.err and "empty.png" in captured.err and "Traceback" not in captured.err
    doc = json.loads(captured.out)
    assert [p["file"] for p in doc["predictions"]] == [str(f) for f in good]
    for p in doc["predictions"]:
        assert len(p["probs"]) == 2 and 1.0 >= p["probs"][0] >= p["probs"][1] >= 0.0
        assert set(p["classes"]) <= set(COLOURS)
    assert main(["predict", str(folder_run), str(good[0])]) == 0
    assert capsys.readouterr().out.startswith(f"{good[0]}: ")


# ---------------------------------------------------------------------------------------------- export


def test_export_onnx_parity_through_onnxruntime(digits_run: Path, tmp_path: Path, capsys) -> None:
    import onnxruntime as ort

    out = tmp_path / "digits.onnx"
    assert main(["export", str(digits_run), "--format", "onnx", "--output", str(out)]) == 0
    assert "max |onnx - pytorch|" in capsys.readouterr().out
    meta = json.loads((tmp_path / "digits.onnx.json").read_text())
    assert meta["arch"] == "resnet20" and meta["num_classes"] == 10 and meta["in_chans"] == 1
    assert meta["input_size"] == [8, 8] and len(meta["mean"]) == len(meta["std"]) == 1
    assert meta["format"] == "onnx" and meta["resnetlab_version"] == resnetlab.__version__
    assert 0.0 <= meta["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # symbolic: dynamic batch
    model, _, _ = load_for_inference(digits_run, fuse=False)
    for batch in (1, 5):
        x = _digits_input(batch)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            assert np.abs(got - model(x).numpy()).max() <= 1e-4


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_torchscript_and_safetensors(digits_run: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model, _, _ = load_for_inference(digits_run, fuse=False)
    x = _digits_input(4)
    ts = export_model(digits_run, "torchscript", tmp_path)
    assert ts.path == tmp_path / "resnet20.torchscript.pt" and ts.max_abs_diff <= 1e-4
    scripted = torch.jit.load(str(ts.path))
    st = export_model(digits_run, "safetensors")  # default: in the run folder
    assert st.path == digits_run / "resnet20.safetensors" and st.metadata_path.is_file()
    fresh = create_model("resnet20", num_classes=10, in_chans=1).eval()
    fresh.load_state_dict(load_file(str(st.path)))
    reloaded, _, _ = load_for_inference(st.path)  # the export is itself a loadable source
    with torch.no_grad():
        want = model(x)
        assert (scripted(x) - want).abs().max().item() <= 1e-4
        assert torch.equal(fresh(x), want)
        assert (reloaded(x) - want).abs().max().item() <= 1e-4


def test_export_fails_above_tolerance_and_writes_nothing(digits_run: Path, tmp_path: Path,
                                                          monkeypatch, capsys) -> None:
    import resnetlab.export as export_module

    real = export_module.fuse_for_inference

    def broken_fuse(model: nn.Module) -> nn.Module:  # a folding bug: shifts every logit by 1e-3
        fused = real(model)
        with torch.no_grad():
            fused.fc.bias += 1e-3
        return fused

    monkeypatch.setattr(export_module, "fuse_for_inference", broken_fuse)
    out = tmp_path / "bad.pt"
    assert main(["export", str(digits_run), "--format", "torchscript", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "parity" in err and "1e-04" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ExportError, match="was not written"):
        export_model(digits_run, "torchscript", out)


# ---------------------------------------------------------------------------------------------- import


def test_torchvision_import_round_trip(torchvision_weights, imported: Path) -> None:
    _, _, tv = torchvision_weights
    plain, cfg, meta = load_for_inference(imported, fuse=False)
    fused, _, _ = load_for_inference(imported)
    assert cfg.model.name == "resnet18" and meta.classes == ("red", "green", "blue")
    assert meta.input_size == (224, 224) and meta.resize == 256 and meta.in_chans == 3
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # [b, c, h, w]
    with torch.no_grad():
        want = tv(x)
        assert (plain(x) - want).abs().max().item() <= 1e-5
        assert (fused(x) - want).abs().max().item() <= 1e-4


def test_imported_checkpoint_works_with_eval_predict_export(imported: Path, folder_root: Path,
                                                            tmp_path: Path, capsys) -> None:
    # eval: folder classes (sorted) are matched to the checkpoint's classes by name
    report = evaluate_checkpoint(imported, "val")
    val_files = sorted((folder_root / "val").rglob("*.*"))
    assert report.metrics["count"] == len(val_files) and report.classes == ["red", "green", "blue"]
    result = predict(imported, [folder_root / "val"], topk=1)
    assert len(result.predictions) == len(val_files) and not result.errors
    # the same confusion matrix, built from predict's answers and the folder names
    ids = {name: i for i, name in enumerate(report.classes)}
    cm = [[0] * 3 for _ in range(3)]
    for p in result.predictions:
        cm[ids[Path(p.file).parent.name]][p.indices[0]] += 1
    assert report.confusion == cm
    assert [r["count"] for r in report.per_class] == [len(list((folder_root / "val" / c).iterdir()))
                                                      for c in report.classes]
    assert main(["export", str(imported), "--format", "safetensors", "--output", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "resnet18.safetensors.json").read_text())
    assert meta["classes"] == ["red", "green", "blue"] and meta["input_size"] == [224, 224]


def test_import_cli_and_errors_that_name_the_problem(torchvision_weights, tmp_path: Path, capsys) -> None:
    pth, classes, _ = torchvision_weights
    assert main(["import", "torchvision", str(pth), "--arch", "resnet18", "--output", str(tmp_path / "ok.pt")]) == 0
    assert "3 classes" in capsys.readouterr().out  # read off fc.weight
    assert load_for_inference(tmp_path / "ok.pt")[2].classes == ("0", "1", "2")  # no --classes
    assert main(["import", "torchvision", str(pth), "--arch", "resnet34", "--output", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err  # resnet34 has 3 blocks in layer1, resnet18 2; it says which fits
    assert "--arch resnet34 does not fit the weights" in err and "missing key(s), e.g. layer1.2" in err and "they fit: resnet18" in err
    (tmp_path / "two.txt").write_text("a\nb\n")
    assert main(["import", "torchvision", str(pth), "--arch", "resnet18", "--classes", str(tmp_path / "two.txt"),
                 "--output", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert "two.txt" in err and "2 class names" in err and "3 outputs" in err
    assert main(["import", "torchvision", str(pth), "--arch", "resnet19"]) == 2
    assert "resnet18" in capsys.readouterr().err  # the closest names are offered
    assert not (tmp_path / "x.pt").exists()
    assert main(["eval", str(pth)]) == 2  # a bare state dict: point at `resnetlab import`
    assert "resnetlab import torchvision" in capsys.readouterr().err
