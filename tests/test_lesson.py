"""The lesson's own network: its classes as the lesson writes them load into ours and agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.models import count_params, create_model, fuse_for_inference, model_defaults
from resnetlab.models.lesson import LessonResNet, ResBlk


# ---- the lesson's code, as written (the course page; formatting restored, comments shortened) ----
class LessonResBlk(nn.Module):
    """resnet block (the lesson's text: stride 1 everywhere)"""

    def __init__(self, ch_in, ch_out):
        super(LessonResBlk, self).__init__()  # noqa: UP008 (as the lesson writes it)
        self.conv1 = nn.Conv2d(ch_in, ch_out, kernel_size=3, stride=1, padding=1)
        self.bn1 = nn.BatchNorm2d(ch_out)
        self.conv2 = nn.Conv2d(ch_out, ch_out, kernel_size=3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(ch_out)
        self.extra = nn.Sequential()
        if ch_out != ch_in:
            # [b, ch_in, h, w] => [b, ch_out, h, w]
            self.extra = nn.Sequential(nn.Conv2d(ch_in, ch_out, kernel_size=1, stride=1),
                                       nn.BatchNorm2d(ch_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.extra(x) + out
        return out


class LessonResBlkStride(nn.Module):
    """The course's ResNet18 uses the same block with a stride on conv1 and on the projection."""

    def __init__(self, ch_in, ch_out, stride=1):
        super(LessonResBlkStride, self).__init__()  # noqa: UP008 (as the lesson writes it)
        self.conv1 = nn.Conv2d(ch_in, ch_out, kernel_size=3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(ch_out)
        self.conv2 = nn.Conv2d(ch_out, ch_out, kernel_size=3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(ch_out)
        self.extra = nn.Sequential()
        if ch_out != ch_in:
            self.extra = nn.Sequential(nn.Conv2d(ch_in, ch_out, kernel_size=1, stride=stride),
                                       nn.BatchNorm2d(ch_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = self.extra(x) + out
        return out


class LessonResNet18(nn.Module):
    def __init__(self):
        super(LessonResNet18, self).__init__()  # noqa: UP008 (as the lesson writes it)
        self.conv1 = nn.Sequential(nn.Conv2d(3, 64, kernel_size=3, stride=3, padding=0),
                                   nn.BatchNorm2d(64))
        self.blk1 = LessonResBlkStride(64, 128, stride=2)
        self.blk2 = LessonResBlkStride(128, 256, stride=2)
        self.blk3 = LessonResBlkStride(256, 512, stride=2)
        self.blk4 = LessonResBlkStride(512, 512, stride=2)
        self.outlayer = nn.Linear(512 * 1 * 1, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.blk1(x)
        x = self.blk2(x)
        x = self.blk3(x)
        x = self.blk4(x)
        x = F.adaptive_avg_pool2d(x, [1, 1])
        x = x.view(x.size(0), -1)
        x = self.outlayer(x)
        return x


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


# ------------------------------------------------------------------------------ tests ----
@pytest.mark.parametrize(("ch_in", "ch_out"), [(8, 8), (8, 16)])
def test_seed_resblk_loads_strictly_and_matches(ch_in, ch_out):
    torch.manual_seed(0)
    theirs = LessonResBlk(ch_in, ch_out)
    randomise_bn(theirs)
    ours = ResBlk(ch_in, ch_out)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, ch_in, 6, 6)
    for mode in ("train", "eval"):  # batch statistics and running statistics
        getattr(theirs, mode)(), getattr(ours, mode)()
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_lesson_resnet18_loads_strictly_and_matches_including_block4_broadcast():
    torch.manual_seed(0)
    theirs = LessonResNet18()
    randomise_bn(theirs)
    ours = create_model("lesson_resnet18")
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.eval(), ours.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
        # block 4: a [b, 512, 1, 1] branch broadcast onto the [b, 512, 2, 2] input
        h = ours.blk3(ours.blk2(ours.blk1(F.relu(ours.conv1(x)))))
        assert h.shape == (2, 512, 2, 2) and ours.blk4.branch(h).shape == (2, 512, 1, 1)
        assert ours.blk4(h).shape == (2, 512, 2, 2)
        torch.testing.assert_close(ours.blk4(h), h + ours.blk4.branch(h), rtol=0, atol=0)
        # the fused inference copy agrees (conv biases fold with the BN)
        torch.testing.assert_close(fuse_for_inference(ours)(x), theirs(x), rtol=1e-4, atol=1e-4)


def test_corrected_variant_projects_block4_and_plain_twin_has_no_shortcut():
    corrected = create_model("lesson_resnet18_corrected").eval()
    assert isinstance(corrected.blk4.extra[0], nn.Conv2d) and corrected.blk4.extra[0].stride == (2, 2)
    h = torch.randn(1, 512, 2, 2)
    with torch.no_grad():
        assert corrected.blk4(h).shape == (1, 512, 1, 1)
    plain = create_model("lesson_plain18").eval()
    assert not any("extra" in k for k in plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain.blk2(h[:, :128]), plain.blk2.branch(h[:, :128]))
    assert model_defaults("lesson_plain18")["plain"] is True


def test_parameter_counts_by_hand():
    def conv(i, o, k):  # weight + bias
        return i * o * k * k + o

    def bn(c):
        return 2 * c

    def blk(i, o, project):
        return conv(i, o, 3) + bn(o) + conv(o, o, 3) + bn(o) + ((conv(i, o, 1) + bn(o)) if project else 0)

    body = conv(3, 64, 3) + bn(64) + 512 * 10 + 10
    widths = [(64, 128), (128, 256), (256, 512), (512, 512)]
    lesson = body + sum(blk(i, o, i != o) for i, o in widths)
    assert count_params(create_model("lesson_resnet18")) == lesson == count_params(LessonResNet18())
    assert count_params(create_model("lesson_resnet18_corrected")) == body + sum(
        blk(i, o, True) for i, o in widths)
    assert count_params(create_model("lesson_plain18")) == body + sum(blk(i, o, False) for i, o in widths)


def test_small_inputs_are_resized_to_32_and_digits_channels_work():
    torch.manual_seed(0)
    model = LessonResNet(num_classes=10, in_chans=1).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        up = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(x), model(up), rtol=0, atol=0)
        y = x
        for _, piece in model.named_stages():
            y = piece(y)
        torch.testing.assert_close(y, model(x), rtol=0, atol=0)


def test_checkpointed_training_step_equals_the_stored_one():
    torch.manual_seed(0)
    a = LessonResNet(num_classes=4, in_chans=1, widths=(4, 8, 12, 16, 16))
    b = LessonResNet(num_classes=4, in_chans=1, widths=(4, 8, 12, 16, 16), grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 1, 8, 8)
    for m in (a, b):
        m(x).square().sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)
    for (n, sa), sb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(sa, sb, msg=n)  # BN running stats updated once, not twice
