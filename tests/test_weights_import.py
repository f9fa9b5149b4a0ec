"""Imported torchvision/timm weights keep the class names their source carries."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torchvision
from safetensors.torch import save_file

from resnetlab.importers import import_torchvision, source_class_names
from resnetlab.inference import load_for_inference


def test_imagenet_weights_get_torchvision_categories(tmp_path: Path) -> None:
    names = source_class_names(tmp_path / "resnet50.pth", "resnet50", 1000)
    want = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    assert names == want and names[0] == "tench"
    assert source_class_names(tmp_path / "x.pth", "resnet20", 1000) == [str(i) for i in range(1000)]


def test_timm_folder_label_names_and_classes_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=3).eval()
    folder = tmp_path / "timm-resnet18"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 3,
                                                   "label_names": ["cat", "dog", "eel"]}))
    res = import_torchvision(folder, "resnet18", output=tmp_path / "a.pt")
    assert load_for_inference(res.path)[2].classes == ("cat", "dog", "eel")
    (tmp_path / "classes.txt").write_text("x\ny\nz\n")  # --classes still wins
    res = import_torchvision(folder / "model.safetensors", "resnet18", tmp_path / "classes.txt",
                             output=tmp_path / "b.pt")
    assert load_for_inference(res.path)[2].classes == ("x", "y", "z")
