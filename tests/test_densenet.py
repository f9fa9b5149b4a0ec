"""DenseNet: torchvision's names and outputs, DenseNet-BC-100's size, memory-efficient backward."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.densenet import DenseNet as TorchvisionDenseNet

from resnetlab.models import count_params, create_model, fuse_for_inference
from resnetlab.models.densenet import DenseNet

# torchvision's constructors: (growth_rate, block_config, num_init_features)
TV = {"densenet121": (32, (6, 12, 24, 16), 64), "densenet161": (48, (6, 12, 36, 24), 96),
      "densenet169": (32, (6, 12, 32, 32), 64), "densenet201": (32, (6, 12, 48, 32), 64)}
# parameters that torchvision's docs list for these nets (weights pages), in millions
TV_PARAMS = {"densenet121": 7978856, "densenet161": 28681000, "densenet169": 14149480,
             "densenet201": 20013928}


def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) * 0.4 + 0.3)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 1.0)


@pytest.mark.parametrize("name", list(TV))
def test_torchvision_names_shapes_and_counts(name):
    # Structure only, on the meta device: the full nets cost nothing to build there.
    with torch.device("meta"):
        ours = create_model(name)
        theirs = getattr(torchvision.models, name)()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
        [(k, v.shape) for k, v in theirs.state_dict().items()]
    assert count_params(ours) == count_params(theirs) == TV_PARAMS[name]
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)


def test_densenet121_state_dict_loads_and_matches():
    torch.manual_seed(0)
    theirs = torchvision.models.densenet121()
    randomise_bn(theirs)
    with torch.device("meta"):
        ours = create_model("densenet121")
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    theirs.eval(), ours.eval()
    x = torch.randn(1, 3, 32, 32)  # small input: 32 -> 1x1 in the last block
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(TV))
def test_same_forward_as_torchvision_on_a_scaled_down_config(name):
    # Each net's own layout (growth rate, init width, four blocks) with fewer layers per block,
    # so the forward comparison stays cheap; the full configs are checked structurally above.
    k, blocks, init = TV[name]
    small = tuple(max(1, n // 6) for n in blocks)
    torch.manual_seed(0)
    theirs = TorchvisionDenseNet(growth_rate=k, block_config=small, num_init_features=init, num_classes=5)
    randomise_bn(theirs)
    ours = DenseNet(small, growth_rate=k, num_init_features=init, stem="imagenet", num_classes=5)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    theirs.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fuse_for_inference(ours)(x), theirs(x), rtol=1e-4, atol=1e-4)


def test_densenet_bc100_matches_the_paper():
    model = create_model("densenet_bc100")
    # Table 2: DenseNet-BC (L=100, k=12), 0.8M parameters
    assert f"{count_params(model) / 1e6:.1f}M" == "0.8M"
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 100  # depth = convs + the classifier
    assert model.features.conv0.out_channels == 24 and model.num_features == 342
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_grad_checkpointing_gives_the_same_step():
    torch.manual_seed(0)
    a = DenseNet((2, 2), growth_rate=4, num_classes=3, in_chans=1)
    b = DenseNet((2, 2), growth_rate=4, num_classes=3, in_chans=1)
    b.load_state_dict(a.state_dict())
    b.grad_checkpointing = True
    assert all(layer.memory_efficient for layer in b.blocks())
    x = torch.randn(4, 1, 8, 8)
    for m in (a, b):
        m(x).square().sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)
    for (n, sa), sb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(sa, sb, msg=n)  # running stats: one update per step


def test_densenet_refuses_zero_init_residual():
    with pytest.raises(ValueError, match="residual"):
        create_model("densenet_bc100", zero_init_residual=True)
