"""Loss landscape and layer responses: the mathematics on tiny nets, and the commands end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.analysis import AnalysisError
from resnetlab.analysis.landscape import (
    LandscapeResult,
    load_landscape,
    plot_landscapes,
    roughness_markdown,
)
from resnetlab.analysis.loss_surface import (
    filter_normalized_direction,
    grid_points,
    hessian_extremes,
    landscape_batched,
    landscape_loop,
    second_difference,
)
from resnetlab.analysis.responses import ResponseStats, layer_response_stds, response_modules
from resnetlab.cli import main
from resnetlab.models import BasicBlock, ResNet, create_model


def tiny_resnet(plain: bool = False, seed: int = 0) -> ResNet:
    torch.manual_seed(seed)
    model = ResNet(BasicBlock, (1, 1, 1), stem="cifar", num_classes=4, in_chans=1, stem_width=4,
                   shortcut="A", plain=plain)
    with torch.no_grad():  # non-trivial BN so eval and batch modes differ
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def data(n: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


# ------------------------------------------------------------------ filter normalisation ----
def test_filter_normalised_direction_norms_equal_weight_norms_and_bn_bias_are_zero():
    model = tiny_resnet()
    d = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    assert set(d) == {n for n, _ in model.named_parameters()}
    checked = 0
    for name, w in model.named_parameters():
        if w.ndim >= 2:  # conv [out, in, k, k] and linear [out, in]: one norm per filter
            torch.testing.assert_close(d[name].flatten(1).norm(dim=1), w.detach().flatten(1).norm(dim=1))
            assert not torch.allclose(d[name], w)  # random, not the weight itself
            checked += 1
        else:  # BN weights/biases and the linear bias
            assert torch.count_nonzero(d[name]) == 0, name
    assert checked == 8  # 7 convs + fc
    again = filter_normalized_direction(model, torch.Generator().manual_seed(0))
    assert all(torch.equal(d[k], again[k]) for k in d)  # seeded


# ---------------------------------------------------------------------------- the grid ----
@pytest.mark.parametrize("bn", ["batch", "eval"])
def test_landscape_at_zero_is_the_models_own_loss(bn):
    model = tiny_resnet()
    x, y = data()
    g = torch.Generator().manual_seed(0)
    d1, d2 = filter_normalized_direction(model, g), filter_normalized_direction(model, g)
    loss, acc = landscape_batched(model, x, y, d1, d2, [(0.0, 0.0), (0.5, -0.5)], bn=bn, chunk=2)
    with torch.no_grad():
        if bn == "eval":
            logits = model(x)
        else:  # batch statistics of x, running buffers untouched
            before = {k: v.clone() for k, v in model.state_dict().items()}
            ref = tiny_resnet()
            for m in ref.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.train()
                    m.momentum = 0.0  # training-mode BN, running stats kept
            logits = ref(x)
            assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # float32 forward in both; vmap reorders nothing in the reductions that matter here
    torch.testing.assert_close(loss[0], F.cross_entropy(logits, y), rtol=1e-5, atol=1e-6)
    assert acc[0] == (logits.argmax(1) == y).float().mean()
    assert not torch.isclose(loss[1], loss[0])  # the offset moves the loss


def test_batched_grid_equals_the_state_dict_loop():
    model = tiny_resnet()
    x, y = data()
    g = torch.Generator().manual_seed(3)
    d1, d2 = filter_normalized_direction(model, g), filter_normalized_direction(model, g)
    points = grid_points([-1.0, 0.0, 1.0], [-0.5, 0.5])
    assert points[:3] == [(-1.0, -0.5), (0.0, -0.5), (1.0, -0.5)]  # row-major over b, then a
    for bn in ("batch", "eval"):
        fast = landscape_batched(model, x, y, d1, d2, points, bn=bn, chunk=4)  # 4 + 2 points
        slow = landscape_loop(model, x, y, d1, d2, points, bn=bn)
        # same float32 arithmetic, different kernels (grouped conv under vmap): rounding only
        torch.testing.assert_close(fast[0], slow[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast[1], slow[1])


def test_second_difference_of_a_parabola_is_its_curvature():
    a = torch.linspace(-1, 1, 11, dtype=torch.float64)
    step = float(a[1] - a[0])
    assert second_difference(3 * a**2, step) == pytest.approx(6.0)  # d2/da2 of 3a^2
    grid = a.view(1, -1) ** 2 + 2 * a.view(-1, 1) ** 2  # [b, a]: curvature 2 along a, 4 along b
    assert second_difference(grid, step) == pytest.approx(3.0)
    with pytest.raises(AnalysisError):
        second_difference(torch.zeros(2), 1.0)


def test_hessian_extremes_of_a_quadratic_model():
    # loss = CE of a linear model; check against the full Hessian computed by autograd.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False))
    x, y = torch.randn(16, 1, 2, 2), torch.randint(0, 3, (16,))
    w = model[1].weight

    def loss_of(flat):
        return F.cross_entropy(x.flatten(1) @ flat.view(3, 4).T, y)

    eig = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, w.detach().flatten()))
    res = hessian_extremes(model, x, y, bn="eval", iters=300)
    assert res["lambda_max"] == pytest.approx(float(eig[-1]), rel=1e-3)
    assert res["lambda_min"] == pytest.approx(float(eig[0]), abs=1e-3 * float(eig[-1]))


# --------------------------------------------------------------------------- responses ----
def test_response_hook_captures_exactly_the_pre_addition_tensor():
    model = tiny_resnet()
    block = model.layer2[0]  # stride 2, option-A shortcut
    names = [n for n, _ in response_modules(model)]
    assert names[0] == "bn1" and "layer2.0.bn1" in names and "layer2.0.bn2" in names
    assert len(names) == 7  # stem + 2 per block: every 3x3 conv
    stats = ResponseStats(model, keep=True)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        h = model.layer1(model.relu(model.bn1(model.conv1(x))))
        model(x)
        branch = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(h)))))  # F(x), by hand
        torch.testing.assert_close(stats.captured["layer2.0.bn2"], branch, rtol=0, atol=0)
        # and it is *before* the addition and the ReLU: the block's output is relu(F(x) + x)
        torch.testing.assert_close(block(h), F.relu(stats.captured["layer2.0.bn2"] + block.downsample(h)))
        assert (stats.captured["layer2.0.bn1"] < 0).any()  # before the ReLU
    stats.remove()


def test_response_stds_over_batches_equal_the_std_of_everything():
    model = tiny_resnet()
    x, y = data(n=10)
    rows = layer_response_stds(model, [(x[:6], y[:6]), (x[6:], y[6:])])
    with torch.no_grad():
        whole = model.layer3[0].bn2(model.layer3[0].conv2(F.relu(model.layer3[0].bn1(model.layer3[0].conv1(
            model.layer2(model.layer1(model.relu(model.bn1(model.conv1(x))))))))))
    row = next(r for r in rows if r["layer"] == "layer3.0.bn2")
    assert row["std"] == pytest.approx(float(whole.double().std(unbiased=False)), rel=1e-6)
    assert [r["index"] for r in rows] == list(range(1, 8))


def test_responses_of_densenet_and_lesson_nets_find_their_3x3_layers():
    dense = create_model("densenet_bc100")
    assert len(response_modules(dense)) == 1 + 48  # stem + one 3x3 per dense layer
    lesson = create_model("lesson_resnet18")
    assert [n for n, _ in response_modules(lesson)][:3] == ["conv1.1", "blk1.bn1", "blk1.bn2"]


# ------------------------------------------------------------------------- the commands ----
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    code = main(["train", "--quiet", "model.name=resnet20", "train.epochs=1", f"run.root={root}",
                 "run.name=r20", "train.tensorboard=false", "optim.warmup=none"])
    assert code == 0
    return root / "r20"


def test_landscape_cli_writes_csv_figure_json(tiny_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ls"
    code = main(["landscape", str(tiny_run), "--grid", "3", "--images", "16", "--hessian-iters", "2",
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "loss at w" in printed and "lambda_max" in printed
    rows = read_csv(out / "landscape.csv")
    assert len(rows) == 9 and {r["model"] for r in rows} == {"resnet20"}
    doc = json.loads((out / "landscape.json").read_text())
    centre = next(r for r in rows if float(r["a"]) == 0 and float(r["b"]) == 0)
    assert float(centre["loss"]) == pytest.approx(doc["loss_at_zero"], rel=1e-4)
    assert doc["bn"] == "batch" and doc["roughness"]["hvps"] == 4
    assert (out / "landscape.png").stat().st_size > 1000
    back = load_landscape(out)  # the CSV and JSON give the grid back, for re-plotting
    assert back.loss.shape == (3, 3) and float(back.loss[1, 1]) == pytest.approx(doc["loss_at_zero"], rel=1e-4)
    assert plot_landscapes([back, back], tmp_path / "two.png")[0].stat().st_size > 1000
    code = main(["landscape", str(tiny_run), "--dims", "1", "--grid", "5", "--images", "8",
                 "--hessian-iters", "0", "--bn", "eval", "--out", str(out / "1d")])
    assert code == 0 and len(read_csv(out / "1d" / "landscape.csv")) == 5


def test_landscape_refuses_bad_input_in_one_line(tiny_run: Path, capsys) -> None:
    assert main(["landscape", str(tiny_run), "--grid", "2"]) == 2
    assert "--grid must be an integer from 3 to 201" in capsys.readouterr().err
    assert main(["landscape", str(tiny_run.parent / "nope")]) == 2


def test_responses_cli_writes_csv_and_figure(tiny_run: Path, tmp_path: Path, capsys) -> None:
    code = main(["responses", str(tiny_run), "--out", str(tmp_path / "resp")])
    assert code == 0
    rows = read_csv(tmp_path / "resp" / "responses.csv")
    assert len(rows) == 19 and all(float(r["std"]) > 0 for r in rows)  # resnet20: 19 3x3 convs
    assert (tmp_path / "resp" / "responses.png").stat().st_size > 1000
    assert "resnet20 | 19 |" in capsys.readouterr().out


@pytest.mark.parametrize(("dims", "where"), [(1, "along the line."), (2, "over the grid, both axes.")])
def test_roughness_note_names_the_scan_it_was_measured_on(tmp_path: Path, dims: int, where: str) -> None:
    shape = (5,) if dims == 1 else (5, 5)
    r = LandscapeResult("resnet20", tmp_path, [-1.0, -0.5, 0.0, 0.5, 1.0], dims, torch.ones(shape),
                        torch.ones(shape), 1.0, {"second_difference": 0.0})
    note = roughness_markdown([r]).splitlines()[-1]
    assert note.startswith("Mean abs 2nd difference") and f"h^2 {where}" in note
