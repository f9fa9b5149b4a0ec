"""The model contract (ClassifierNet): freezing, per-layer lr, weights loading, Grad-CAM and
feature extraction ask the model for its head and stages; a family whose classifier is not
called ``fc`` and whose stages are not ``layer<i>`` works end to end without touching the package."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import resnetlab
from resnetlab import checkpoint as ckpt
from resnetlab.engine.optim import lr_scales
from resnetlab.explain import cam_layer, grad_cam
from resnetlab.inference import load_for_inference
from resnetlab.models import ClassifierNet, create_model, registry


class TinyNet(ClassifierNet):
    """stem -> body.a (8 ch) -> body.b (16 ch, stride 2) -> pool -> ``head``."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0,
                 **_options: Any) -> None:  # the ModelSpec options a test net need not honour
        super().__init__()
        self.input_size, self.num_classes, self.num_features, self.drop_rate = (in_chans, 8, 8), num_classes, 16, drop_rate
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.ModuleDict({
            "a": nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
            "b": nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()),
        })
        self.stage_names = ["body.a", "body.b"]
        self.head: nn.Module = nn.Linear(16, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body["b"](self.body["a"](self.stem(x)))  # [b, 16, h/2, w/2]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))  # [b, 16]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes, self.head = num_classes, nn.Linear(16, num_classes)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass

    def named_stages(self) -> list[tuple[str, nn.Module]]:
        pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        return [("stem", self.stem), ("a", self.body["a"]), ("b", self.body["b"]), ("pool", pool),
                ("fc", self.head)]


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> str:
    """``tiny_contract`` registered for this test only."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_model("tiny_contract")(TinyNet)
    return "tiny_contract"


def test_head_and_stages_come_from_the_model(tiny: str) -> None:
    model = create_model(tiny)
    assert model.classifier_name() == "head" and [n for n, _ in model.stages()] == ["body.a", "body.b"]
    scales = lr_scales(model, resnetlab.load_config(None, ["optim.layer_decay=0.5"]).optim)
    assert scales["stem.0.weight"] == 0.125 and scales["body.a.0.weight"] == 0.25
    assert scales["body.b.0.weight"] == 0.5 and scales["head.weight"] == 1.0
    five, ten = create_model(tiny, num_classes=5), create_model(tiny, num_classes=10)
    with pytest.raises(ckpt.CheckpointError, match=r"head\.weight.*re-initialise the head"):
        ckpt.load_weights(five, ten.state_dict())
    ckpt.load_weights(five, ten.state_dict(), reinit_head=True)
    assert torch.equal(five.stem[0].weight, ten.stem[0].weight) and five.head.weight.shape == (5, 16)
    features = create_model(tiny, features_only=True, out_indices=(1, 2))
    assert features.feature_info.channels() == [8, 16] and features.feature_info.reduction() == [1, 2]
    maps = features(torch.randn(2, 1, 8, 8))
    assert [tuple(m.shape) for m in maps] == [(2, 8, 8, 8), (2, 16, 4, 4)]
    assert "head.weight" not in features.state_dict()  # the classifier is left out
    with pytest.raises(ValueError, match=r"out_indices must be levels in \[0, 2\]"):
        create_model(tiny, features_only=True, out_indices=(3,))


def test_fine_tune_freeze_and_explain_a_family_without_fc(tiny: str, quick: list[str]) -> None:
    base = [*quick, f"model.name={tiny}", "train.epochs=1", "data.classes=[0,1,2,3,4]"]
    source = resnetlab.train(None, [*base, "run.name=source"]).run_dir
    tuned = resnetlab.train(None, [*base[:-1], "run.name=tuned", f"model.init_from={source}",
                                   "train.freeze=backbone"]).run_dir
    before = ckpt.read(source).model
    after = ckpt.read(tuned).model
    assert after["head.weight"].shape == (10, 16)  # 5 classes -> 10: a new head, trained
    for k, v in before.items():
        if not k.startswith("head."):  # the frozen backbone, BN statistics included, bit for bit
            assert torch.equal(after[k], v), k
    model, _cfg, meta = load_for_inference(tuned)
    assert cam_layer(model) is model.get_submodule("body.b")
    x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    cam = grad_cam(model, meta, x, [0, 1])
    assert cam.shape == (2, 8, 8) and float(cam.min()) >= 0 and float(cam.max()) <= 1


def test_spec_checks_a_family_registered_without_layers(tiny: str) -> None:
    cfg = resnetlab.load_config(None, [f"model.name={tiny}"])  # validate() runs ModelSpec.check
    assert cfg.model.name == tiny
