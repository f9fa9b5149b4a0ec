"""torch.hub entry points for resnetlab, one per family; they work offline from a checkout:

    model = torch.hub.load("path/to/resnetlab", "resnet20", weights="fashion_mnist", source="local")
    torch.hub.list("path/to/resnetlab", source="local")
    print(torch.hub.help("path/to/resnetlab", "resnet", source="local"))

``weights`` is a tag of the shipped weights (``resnetlab weights`` lists them), a full name such
as ``"resnet20.digits"``, ``"DEFAULT"``, or a folder written by ``resnetlab publish``;
``pretrained=True`` means ``"DEFAULT"``. Nothing is downloaded: the shipped weights are files in
the package. Other keyword arguments go to the network (``num_classes``, ``in_chans``, ...).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

dependencies = ["torch", "torchvision", "numpy", "safetensors", "yaml", "PIL"]

# A checkout that was never pip-installed: import the package from its src/ folder.
_SRC = Path(__file__).resolve().parent / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))


def _create(name: str, weights: Any, pretrained: bool, kwargs: dict[str, Any]) -> Any:
    import resnetlab

    return resnetlab.create_model(name, weights=weights, pretrained=pretrained, **kwargs)


def resnet20(weights: Any = None, pretrained: bool = False, **kwargs: Any) -> Any:
    """ResNet-20 for 32x32 images (He et al. 2015, Sec. 4.2: 3 stages of 3 basic blocks, option
    A shortcuts, 0.27M parameters). Shipped weights: ``digits`` (8x8 grey digits, the default)
    and ``fashion_mnist`` (28x28 grey clothing)."""
    return _create("resnet20", weights, pretrained, kwargs)


def resnet56(weights: Any = None, pretrained: bool = False, **kwargs: Any) -> Any:
    """ResNet-56 for 32x32 images (9 basic blocks per stage, 0.85M parameters). No weights ship
    (its Fashion-MNIST training did not fit the CPU budget the shipped weights were made with);
    ``weights=`` takes a folder written by ``resnetlab publish``."""
    return _create("resnet56", weights, pretrained, kwargs)


def resnet(name: str = "resnet20", weights: Any = None, pretrained: bool = False, **kwargs: Any) -> Any:
    """Any residual network by registry name: the CIFAR family (resnet20 ... resnet1202), the
    ImageNet family (resnet18 ... resnet152, wide_resnet50_2, resnext50_32x4d) and the
    pre-activation nets (preact_resnet*). ``resnetlab models`` lists them; ImageNet weights do
    not ship (import torchvision's with ``resnetlab import torchvision FILE --arch NAME``)."""
    return _create(name, weights, pretrained, kwargs)


def plain(name: str = "plain20", **kwargs: Any) -> Any:
    """A plain (shortcut-free) twin of a residual network, for the degradation experiment
    (plain20 ... plain110, plain18/34/50). No weights ship."""
    return _create(name, None, False, kwargs)


def densenet(name: str = "densenet_bc100", **kwargs: Any) -> Any:
    """DenseNet (Huang et al. 2017): densenet_bc100 for CIFAR and densenet121/161/169/201 with
    torchvision's parameter names. No weights ship."""
    return _create(name, None, False, kwargs)


def lesson_resnet18(weights: Any = None, pretrained: bool = False, **kwargs: Any) -> Any:
    """The lesson's network (docs/lesson.ipynb): its ResBlk with conv biases and no ReLU after the
    addition, 9.5M parameters. No weights ship: 38 MB in float32 and 19 MB in float16 are over
    the package's 5 MB limit per file; train it with the lesson (``resnetlab lesson``)."""
    return _create("lesson_resnet18", weights, pretrained, kwargs)
