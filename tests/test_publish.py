"""`resnetlab publish`: model.safetensors + timm's config.json + a Hugging Face model card, read
back by resnetlab.load, model.init_from and (for timm's architectures) timm itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision
import yaml
from safetensors import safe_open
from torch import nn

import resnetlab
from resnetlab.cli import main
from resnetlab.config import from_dict
from resnetlab.importers import import_torchvision
from resnetlab.weights import WeightsError, get, read_init_from, resolve_init_from
from resnetlab.weights.publish import publish


def _header(card: Path) -> dict:
    text = card.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_publish_digits_layout_and_card(tmp_path: Path, capsys) -> None:
    src = get("resnet20.digits").folder
    out = tmp_path / "resnet20.mine"
    res = publish(src, out)
    names = {f.name for f in out.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "train_config.yaml", "confusion-test.png",
            "reliability-test.png"} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "resnet20" and cfg["num_classes"] == 10 and cfg["num_features"] == 64
    assert cfg["label_names"] == [str(i) for i in range(10)]
    pc = cfg["pretrained_cfg"]
    assert pc["input_size"] == [1, 8, 8] and pc["crop_pct"] == 1.0 and pc["tag"] == "mine"
    assert len(pc["mean"]) == len(pc["std"]) == 1 and pc["interpolation"] == "box"
    head = _header(out / "README.md")
    assert head["license"] == "mit" and head["library_name"] == "resnetlab" and head["datasets"] == ["digits"]
    assert "image-classification" in head["tags"] and head["metrics"] == ["accuracy"]
    result = head["model-index"][0]["results"][0]
    assert result["dataset"]["split"] == "test"
    assert result["metrics"][0]["value"] == round(res.card["metrics"]["test"]["top1_acc"], 2)
    assert "resnetlab train -c train_config.yaml" in (out / "README.md").read_text()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "resnetlab.config" in f.metadata() and f.metadata()["arch"] == "resnet20"
    # read back three ways: resnetlab.load, create_model(weights=OUT), model.init_from=OUT
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # [b, c, h, w]
    with torch.no_grad():
        want = resnetlab.load(src).model(x)
        assert torch.equal(resnetlab.load(out).model(x), want)
    model = resnetlab.create_model("resnet20", weights=str(out))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in get("resnet20.digits").state_dict().items())
    run_cfg = resolve_init_from(from_dict({"model": {"name": "resnet20", "init_from": str(out)}}))
    assert run_cfg.model.init_from == str((out / "model.safetensors").resolve())
    source = read_init_from(run_cfg)
    assert source is not None and source.kind == "resnetlab" and source.meta is not None
    assert source.meta.classes == tuple(str(i) for i in range(10))
    shipped = resolve_init_from(from_dict({"model": {"name": "resnet20", "init_from": "resnet20.digits"}}))
    assert shipped.model.init_from == str(get("resnet20.digits").file.resolve())  # a shipped name works too
    with pytest.raises(WeightsError, match="not an empty folder"):
        publish(src, out)
    assert main(["publish", str(src), str(out)]) == 2  # the CLI says the same in one line
    assert "pass --force" in capsys.readouterr().err


@pytest.fixture(scope="module")
def imported_resnet18(tmp_path_factory) -> tuple[Path, nn.Module]:
    """Random torchvision resnet18 weights (5 classes, non-trivial BN statistics) imported as a
    resnetlab checkpoint with class names."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=5).eval()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("tv")
    torch.save(tv.state_dict(), folder / "resnet18.pth")
    (folder / "classes.txt").write_text("ant\nbee\ncat\ndog\neel\n")
    res = import_torchvision(folder / "resnet18.pth", "resnet18", folder / "classes.txt")
    return res.path, tv


def test_timm_loads_the_published_folder(tmp_path: Path, imported_resnet18) -> None:
    ckpt, tv = imported_resnet18
    out = tmp_path / "resnet18.random"
    publish(ckpt, out, measure=False)
    head = _header(out / "README.md")
    assert head["library_name"] == "timm" and "timm" in head["tags"]
    card = (out / "README.md").read_text()  # imported, not trained here: the import is the command
    assert "resnetlab import torchvision" in card and "--arch resnet18" in card and "training budget" not in card
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # [b, c, h, w]
    ours = resnetlab.create_model("resnet18", weights=str(out)).eval()
    by_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    # timm keeps a file's classifier only when the overlay says how many classes it has
    by_file = timm.create_model("resnet18", pretrained=True, num_classes=5, pretrained_cfg_overlay={
        "file": str(out / "model.safetensors"), "num_classes": 5}).eval()
    with torch.no_grad():
        want = tv(x)
        for model in (ours, by_dir, by_file):
            got = model(x)
            # same weights, same layer order, same CPU kernels: equal up to float32 summation order
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    cfg = by_dir.pretrained_cfg
    assert cfg["label_names"] == ["ant", "bee", "cat", "dog", "eel"]
    assert tuple(cfg["input_size"]) == (3, 224, 224) and cfg["crop_pct"] == 0.875
    data_cfg = timm.data.resolve_data_config({}, model=by_dir)
    assert data_cfg["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert data_cfg["std"] == pytest.approx((0.229, 0.224, 0.225))
