"""hubconf.py: torch.hub.load from a local checkout, offline."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import torch

from resnetlab.weights import get

REPO = Path(__file__).resolve().parents[1]


def _hubconf():
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hub_entry_points_documented() -> None:
    hub = _hubconf()
    entries = [n for n, f in vars(hub).items() if inspect.isfunction(f) and not n.startswith("_")]
    assert {"resnet20", "resnet56", "resnet", "plain", "densenet", "lesson_resnet18"} <= set(entries)
    assert all(inspect.getdoc(getattr(hub, n)) for n in entries)
    for dep in hub.dependencies:  # torch.hub checks these import before it runs an entry point
        assert importlib.util.find_spec(dep) is not None, dep


def test_hub_load_shipped_weights_offline() -> None:
    model = torch.hub.load(str(REPO), "resnet56", weights="fashion_mnist", source="local", trust_repo=True)
    state = model.state_dict()
    shipped = get("resnet56.fashion_mnist").state_dict()
    assert state.keys() == shipped.keys() and all(torch.equal(state[k], v) for k, v in shipped.items())
    assert model.pretrained_cfg["input_size"] == [1, 28, 28]
    other = torch.hub.load(str(REPO), "resnet", name="resnet32", num_classes=7, source="local", trust_repo=True)
    assert other.arch == "resnet32" and other.fc.out_features == 7
