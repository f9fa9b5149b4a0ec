"""Networks: every registered model runs; paper and torchvision numbers; shortcut semantics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import resnetlab.models.registry as registry
import resnetlab.models.resnet as resnet_module
from resnetlab.models import (
    BasicBlock,
    Block,
    Bottleneck,
    ClassifierNet,
    PreActBasicBlock,
    PreActBottleneck,
    ResNet,
    ShortcutA,
    count_macs,
    count_params,
    create_model,
    format_model_info,
    format_model_table,
    fuse_for_inference,
    list_models,
    model_defaults,
    model_info,
    model_table,
    register_model,
)

REQUIRED = [
    *(f"resnet{d}" for d in (20, 32, 44, 56, 110, 1202)),
    *(f"plain{d}" for d in (20, 32, 44, 56, 110)),
    *(f"preact_resnet{d}" for d in (20, 56, 110)),
    *(f"resnet{d}" for d in (18, 34, 50, 101, 152)),
    "plain18",
    "plain34",
    "preact_resnet18",
    "wide_resnet50_2",
    "resnext50_32x4d",
]
TORCHVISION_TWINS = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "resnext50_32x4d",
]


def meta_model(name: str, **kw) -> ResNet:
    """Structure only: no memory, no init cost."""
    with torch.device("meta"):
        return create_model(name, **kw)


def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN affine and running stats, so folding or name mix-ups change outputs.

    Scales stay below 1 so deep post-activation nets keep outputs of order one.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) * 0.4 + 0.3)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 1.0)


# ------------------------------------------------------------------------ registry ----
def test_required_models_are_registered():
    names = list_models()
    assert set(REQUIRED) <= set(names)
    assert len(names) == len(set(names))


def test_every_registered_model_is_a_classifier_net():
    # create_model promises ClassifierNet's API (timm's names) for every family it builds.
    with torch.device("meta"):
        for name in ("resnet20", "preact_resnet18", "lesson_resnet18", "densenet_bc100"):
            model = create_model(name, num_classes=7)
            assert isinstance(model, ClassifierNet) and model.arch == name
            assert model.num_classes == 7 and model.get_classifier().out_features == 7
    with pytest.raises(TypeError, match="abstract"):
        ClassifierNet()  # type: ignore[abstract]


def test_list_models_pattern_and_natural_order():
    assert list_models("resnet*2*") == ["resnet20", "resnet32", "resnet152", "resnet1202"]
    cifar = [n for n in list_models("resnet*") if model_defaults(n)["stem"] == "cifar"]
    assert cifar == ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202"]
    assert list_models("no_such*") == []


def test_unknown_model_names_closest():
    with pytest.raises(ValueError, match="resnet56"):
        create_model("resnet57")
    with pytest.raises(ValueError, match="preact_resnet20"):
        create_model("preact_resnet_20")


def test_unknown_override_names_closest():
    with pytest.raises(TypeError, match="num_clases.*num_classes"):
        create_model("resnet20", num_clases=3)


def test_default_classes_follow_the_stem():
    assert {model_defaults(n)["stem"] for n in list_models()} == {"cifar", "imagenet"}
    for name, classes, size in [("resnet20", 10, 32), ("preact_resnet18", 1000, 224)]:
        model = meta_model(name)
        assert model.arch == name and model.fc.out_features == classes
        assert model.input_size == (3, size, size)


def test_model_defaults_is_a_copy():
    spec = model_defaults("resnet56")
    assert spec["layers"] == (9, 9, 9) and spec["shortcut"] == "A"
    spec["layers"] = (1, 1, 1)
    assert model_defaults("resnet56")["layers"] == (9, 9, 9)


def test_register_model_call_and_decorator(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register_model("tiny8", block=BasicBlock, layers=(1, 1, 1), stem="cifar", shortcut="A")
    assert count_params(create_model("tiny8")) == count_params(
        ResNet(BasicBlock, (1, 1, 1), stem="cifar", shortcut="A")
    )

    @register_model("tiny8_wide", block=BasicBlock, layers=(1, 1, 1), stem="cifar")
    def tiny8_wide(**kwargs) -> ResNet:
        return ResNet(stem_width=32, **kwargs)

    model = create_model("tiny8_wide", num_classes=3)
    assert model.arch == "tiny8_wide" and model.num_features == 128 and model.num_classes == 3
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny8", block=BasicBlock, layers=(1,))


# ------------------------------------------------------------------- every model ----
@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name, in_chans):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_chans=in_chans)
    cifar = model_defaults(name)["stem"] == "cifar"
    # Smallest inputs that keep >1 value per BN channel in train mode at the last stage.
    size = 16 if cifar else 32
    x = torch.randn(2, in_chans, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    out.logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname}"
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))  # the stem
    assert first_conv.weight.grad.abs().sum() > 0


# -------------------------------------------------------------- paper / torchvision ----
@pytest.mark.parametrize(
    ("depth", "paper"),
    [(20, "0.27M"), (32, "0.46M"), (44, "0.66M"), (56, "0.85M"), (110, "1.7M"), (1202, "19.4M")],
)
def test_cifar_param_counts_match_table6(depth, paper):
    n = count_params(meta_model(f"resnet{depth}", num_classes=10))
    # Table 6 prints two decimals below one million and one above.
    shown = f"{n / 1e6:.2f}M" if n < 1e6 else f"{n / 1e6:.1f}M"
    assert shown == paper
    assert (depth - 2) % 6 == 0 and model_defaults(f"resnet{depth}")["layers"] == (
        (depth - 2) // 6,
    ) * 3


@pytest.mark.parametrize("name", TORCHVISION_TWINS)
def test_torchvision_state_dict_loads_and_matches(name):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)()
    randomise_bn(theirs)
    ours = meta_model(name)  # weights come from `theirs`; skip our own init
    assert count_params(ours) == count_params(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    theirs.eval()
    ours.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ shortcuts ----
def hand_branch(block: Block, x: torch.Tensor) -> torch.Tensor:
    """The residual branch F(x), written out from the papers, without any shortcut."""
    b = block
    if isinstance(b, BasicBlock):
        return b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x)))))
    if isinstance(b, Bottleneck):
        out = F.relu(b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x))))))
        return b.bn3(b.conv3(out))
    if isinstance(b, PreActBasicBlock):
        return b.conv2(F.relu(b.bn2(b.conv1(F.relu(b.bn1(x))))))
    if isinstance(b, PreActBottleneck):
        out = b.conv2(F.relu(b.bn2(b.conv1(F.relu(b.bn1(x))))))
        return b.conv3(F.relu(b.bn3(out)))
    raise TypeError(type(b))


@pytest.mark.parametrize("block_cls", [BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck])
@pytest.mark.parametrize("stride", [1, 2])
def test_plain_block_is_exactly_its_branch(block_cls, stride):
    torch.manual_seed(0)
    inplanes = 8 * block_cls.expansion
    block = block_cls(inplanes, 8, stride=stride, plain=True).eval()
    randomise_bn(block)
    assert block.downsample is None
    assert not any(isinstance(m, (ShortcutA, nn.Sequential)) for m in block.modules())
    x = torch.randn(2, inplanes, 8, 8)
    with torch.no_grad():
        branch = hand_branch(block, x)
        expected = branch if block_cls.preact else F.relu(branch)
        torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
        if stride == 1:  # control: the residual version adds x, so the check can fail
            residual = block_cls(inplanes, 8).eval()
            residual.load_state_dict(block.state_dict())
            assert not torch.allclose(residual(x), expected)


@pytest.mark.parametrize("name", list_models("plain*"))
def test_plain_twins_have_no_shortcut_anywhere(name):
    model = meta_model(name)
    blocks = list(model.blocks())
    assert blocks and all(b.plain and b.downsample is None for b in blocks)
    assert not any(isinstance(m, ShortcutA) for m in model.modules())
    assert not any("downsample" in k for k in model.state_dict())


def test_shortcut_a_has_no_parameters_and_pads_zeros():
    for depth in (20, 56, 110):
        resnet, plain = meta_model(f"resnet{depth}"), meta_model(f"plain{depth}")
        assert count_params(resnet) == count_params(plain)
        assert list(resnet.state_dict()) == list(plain.state_dict())
    model = meta_model("resnet20")
    a_blocks = [n for n, m in model.named_modules() if isinstance(m, ShortcutA)]
    assert a_blocks == ["layer2.0.downsample", "layer3.0.downsample"]

    shortcut = ShortcutA(16, 32, stride=2)
    assert count_params(shortcut) == 0
    x = torch.randn(2, 16, 8, 8)
    y = shortcut(x)  # [2, 32, 4, 4]
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert (y[:, 16:] == 0).all()


def downsample_names(model: ResNet) -> list[str]:
    return [n for n, m in model.named_modules() if n.endswith("downsample")]


def test_shortcut_b_only_where_the_shape_changes():
    with torch.device("meta"):
        cifar = ResNet(BasicBlock, (2, 2, 2), shortcut="B")
        r50 = create_model("resnet50")
    assert downsample_names(cifar) == ["layer2.0.downsample", "layer3.0.downsample"]
    # resnet50's first stage widens 64 -> 256 at stride 1, so it projects too.
    assert downsample_names(r50) == [f"layer{i}.0.downsample" for i in (1, 2, 3, 4)]
    assert isinstance(r50.layer1[0].downsample[0], nn.Conv2d)
    assert isinstance(r50.layer1[0].downsample[1], nn.BatchNorm2d)


def test_shortcut_c_projects_on_every_block():
    with torch.device("meta"):
        model = ResNet(BasicBlock, (2, 2, 2), shortcut="C")
        preact = ResNet(PreActBasicBlock, (2, 2, 2), shortcut="C")
        with_b = ResNet(BasicBlock, (2, 2, 2), shortcut="B")
    assert len(downsample_names(model)) == 6
    assert all(isinstance(b.downsample, nn.Sequential) for b in model.blocks())
    # Pre-activation projections read the normalised input: conv only.
    assert all(len(b.downsample) == 1 for b in preact.blocks())
    assert count_params(model) > count_params(with_b)


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "preact_resnet20", "preact_resnet50"])
def test_zero_init_residual_starts_every_block_as_its_shortcut(name):
    torch.manual_seed(0)
    model = create_model(name, zero_init_residual=True).eval()
    seen_identity = 0
    with torch.no_grad():
        for block in model.blocks():
            x = torch.randn(2, block.conv1.in_channels, 8, 8)
            if block.preact:
                # preact: out = F(x) + shortcut; the projection reads relu(bn1(x))
                pre = F.relu(block.bn1(x))
                expected = x if block.downsample is None else block.downsample(pre)
            else:
                shortcut = x if block.downsample is None else block.downsample(x)
                expected = F.relu(shortcut)
            seen_identity += block.downsample is None
            torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
    assert seen_identity > 0
    # Without the option the same blocks are not identities (the check can fail).
    block = next(b for b in create_model(name).eval().blocks() if b.downsample is None)
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(block(x), x if block.preact else F.relu(x))


def test_invalid_options_are_refused():
    with pytest.raises(ValueError, match="plain"):
        create_model("plain20", zero_init_residual=True)
    with pytest.raises(ValueError, match="stem"):
        ResNet(BasicBlock, (1, 1, 1), stem="mnist")
    with pytest.raises(ValueError, match="shortcut"):
        ResNet(BasicBlock, (1, 1, 1), shortcut="D")
    with pytest.raises(ValueError, match="groups"):
        ResNet(BasicBlock, (1, 1, 1), groups=32)


# -------------------------------------------------------------------- the network ----
def test_features_head_and_classifier_reset():
    torch.manual_seed(0)
    model = create_model("resnet20", drop_rate=0.2).eval()
    x = torch.randn(2, 3, 32, 32)
    fmap = model.forward_features(x)  # timm: unpooled
    assert fmap.shape == (2, 64, 8, 8) and model.num_features == 64
    torch.testing.assert_close(model.forward_head(fmap), model(x))
    feats = model.forward_head(fmap, pre_logits=True)
    torch.testing.assert_close(feats, fmap.mean(dim=(2, 3)))
    assert model.get_classifier() is model.fc
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.num_classes == 5
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), feats)
    model.reset_classifier(0, global_pool="max")
    torch.testing.assert_close(model(x), fmap.amax(dim=(2, 3)))
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="token")


@pytest.mark.parametrize("name", ["resnet20", "preact_resnet18"])
def test_named_stages_chain_to_forward(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    randomise_bn(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = x
        for _, piece in model.named_stages():
            y = piece(y)
        torch.testing.assert_close(y, model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("name", "every", "stages", "segments", "frozen_stem"),
    [
        ("resnet20", 1, None, [1] * 9, False),  # one checkpoint per block, every stage
        ("resnet20", 0, -1, [2, 1, 2, 1], False),  # the defaults: sqrt(3) ~ 2, last stage stored
        ("preact_resnet20", 2, 1, [2, 1], False),
        ("resnet20", 5, 3, [3, 3, 3], False),  # a segment never spans two stages
        # A frozen stem hands the first segment an input without grad: the non-reentrant path.
        ("resnet20", 0, None, [2, 1, 2, 1, 2, 1], True),
    ],
)
def test_grad_checkpointing_is_exact(name, every, stages, segments, frozen_stem, monkeypatch):
    torch.manual_seed(0)
    plain_run = create_model(name).train()
    ckpt_run = create_model(name, checkpoint_every=every, checkpoint_stages=stages).train()
    ckpt_run.load_state_dict(plain_run.state_dict())
    ckpt_run.set_grad_checkpointing(True)
    for model in (plain_run, ckpt_run) if frozen_stem else ():
        for module in (model.conv1, model.bn1):
            module.requires_grad_(False)
    for module in (m for m in ckpt_run.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        module.momentum = None  # cumulative averages: the step counter must stay exact too
    for module in (m for m in plain_run.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        module.momentum = None
    calls = []
    real = resnet_module.checkpoint

    def counting(fn, blocks, *a, **k):
        calls.append((len(blocks), k["use_reentrant"]))
        return real(fn, blocks, *a, **k)

    monkeypatch.setattr(resnet_module, "checkpoint", counting)
    x = torch.randn(4, 3, 16, 16)
    outs = []
    for model in (plain_run, ckpt_run):
        out = model(x)
        out.square().mean().backward()
        outs.append(out)
    assert [n for n, _ in calls] == segments
    # Reentrant (one autograd node per segment) wherever the segment's input requires grad.
    assert [r for _, r in calls] == [not (frozen_stem and i == 0) for i in range(len(calls))]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    grads = dict(plain_run.named_parameters())
    for pname, p in ckpt_run.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and grads[pname].grad is None
            continue
        torch.testing.assert_close(p.grad, grads[pname].grad, rtol=1e-6, atol=1e-7)
    # Recomputation in backward must not move the BN running stats a second time.
    for (k, a), b in zip(
        ckpt_run.state_dict().items(), plain_run.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    calls.clear()
    with torch.no_grad():
        ckpt_run(x)
    ckpt_run.eval()(x)
    assert calls == []  # no checkpointing without grad or in eval


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"checkpoint_every": -1}, "checkpoint_every must be an int >= 0"),
        ({"checkpoint_every": 1.5}, "checkpoint_every must be an int >= 0"),
        ({"checkpoint_stages": 4}, r"checkpoint_stages must be None \(all\) or an int in \[-3, 3\]"),
        ({"checkpoint_stages": -4}, r"in \[-3, 3\] for this 3-stage net, got -4"),
    ],
)
def test_bad_checkpoint_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("resnet20", **kwargs)


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("resnet20", 32),
        ("preact_resnet20", 32),
        ("plain20", 32),
        ("resnet50", 64),
        ("resnext50_32x4d", 64),
        ("preact_resnet50", 64),
    ],
)
def test_fuse_for_inference_matches_eval_model(name, size):
    torch.manual_seed(0)
    model = create_model(name)
    randomise_bn(model)
    fused = fuse_for_inference(model)
    model.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
    bns = [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    if model.preact:  # only each block's leading BN and the final BN read a sum, not a conv
        assert len(bns) == len(list(model.blocks())) + 1
    else:
        assert bns == []
    assert not any(p.requires_grad for p in fused.parameters())
    assert fused.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not fused.training
    # The original is untouched.
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------- summary ----
def test_model_table_macs_and_params():
    rows = {r["name"]: r for r in model_table("resnet[125][08]")}
    assert set(rows) == {"resnet18", "resnet20", "resnet50"}
    assert 4.0e9 <= rows["resnet50"]["macs"] <= 4.2e9  # torchvision: 4.09 GFLOPS
    assert 1.80e9 <= rows["resnet18"]["macs"] <= 1.84e9
    assert 40e6 <= rows["resnet20"]["macs"] <= 42e6  # paper: 41M for resnet20 (Sec. 4.2)
    assert rows["resnet50"]["params"] == 25_557_032
    assert rows["resnet20"]["input_size"] == (3, 32, 32)
    text = format_model_table(list(rows.values()))
    assert "resnet50" in text and "4.09G" in text and "0.27M" in text


def test_count_macs_real_tensors_and_mode_restored():
    model = create_model("resnet20").train()
    assert count_macs(model) == model_table("resnet20")[0]["macs"]
    assert model.training
    assert count_macs(model, (3, 64, 64)) > 3.9 * count_macs(model)


def test_model_info_stages_sum_to_model():
    rows = model_info("resnet56")
    assert [r["stage"] for r in rows] == ["stem", "layer1", "layer2", "layer3", "pool", "fc"]
    shapes = [r["output_shape"] for r in rows]
    assert shapes == [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,), (10,)]
    assert [r["blocks"] for r in rows[1:4]] == [9, 9, 9]
    model = meta_model("resnet56")
    assert sum(r["params"] for r in rows) == count_params(model) == 853_018
    assert sum(r["macs"] for r in rows) == count_macs(model)
    text = format_model_info(rows)
    assert "layer3" in text and "853,018" in text and "64x8x8" in text
    assert model_info("resnet18", input_size=(1, 64, 64), in_chans=1)[-2]["output_shape"] == (512,)


def test_model_spec_is_the_one_source_of_model_options():
    from dataclasses import fields

    from resnetlab.config import ConfigError, ModelConfig, load
    from resnetlab.models import ModelSpec, ModelSpecError

    # The config's model keys are the spec's fields plus the fine-tuning ones, in that order.
    spec_keys = [f.name for f in fields(ModelSpec)]
    assert [f.name for f in fields(ModelConfig)][: len(spec_keys)] == spec_keys
    # Every option reaches create_model under the model's own argument name, and every one is
    # an argument that the ResNet, lesson and DenseNet builders all accept.
    spec = ModelSpec(name="resnet20", recompute_every=2, recompute_stages=None, drop_rate=0.25)
    kw = spec.create_kwargs(num_classes=7, in_chans=1)
    assert kw == {"num_classes": 7, "in_chans": 1, "zero_init_residual": False,
                  "grad_checkpointing": False, "checkpoint_every": 2, "checkpoint_stages": None,
                  "drop_rate": 0.25}
    with torch.device("meta"):
        model = create_model("resnet20", **kw)
    assert (model.checkpoint_every, model.checkpoint_stages, model.num_classes) == (2, None, 7)
    for name in ("lesson_resnet18", "densenet_bc100"):
        with torch.device("meta"):
            create_model(name, **ModelSpec(name=name).create_kwargs(10, 3))
    # The checks live in the spec; the config reports them under model.*.
    with pytest.raises(ModelSpecError, match=r"^recompute_stages must be null \(all\) or in \[-3, 3\]"):
        ModelSpec(recompute_stages=4).check()
    with pytest.raises(ConfigError, match=r"^model\.recompute_stages must be null"):
        load(None, ["model.recompute_stages=4"])
    with pytest.raises(ConfigError, match=r"^model\.name: unknown model 'resnet21'"):
        load(None, ["model.name=resnet21"])
