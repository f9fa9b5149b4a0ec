"""The shipped weights and the weights API: get, meta, transforms, create_model(weights=,
pretrained=), list_models(pretrained=True), `resnetlab models --pretrained`, `weights verify`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import resnetlab
from resnetlab.cli import main
from resnetlab.models import count_params
from resnetlab.weights import WeightsError, get, list_weights
from resnetlab.weights.build import RECIPES, verify

MAX_FILE = 5 * 2**20  # bytes: each shipped file stays well under 5 MB


def _digit_images() -> list[Image.Image]:
    """Three 8x8 grey images with light strokes on dark, as the digits are drawn."""
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(8, 8, generator=g) * 255).to(torch.uint8).numpy(), "L") for _ in range(3)]


def test_weights_ship_with_cards() -> None:
    names = list_weights()
    assert "resnet20.digits" in names  # the one every installation can verify (scikit-learn's digits)
    total = 0
    for name in names:
        w = get(name)
        meta = w.meta
        assert name in RECIPES, f"{name} has no zoo recipe: `resnetlab zoo build` cannot re-make it"
        assert meta["command"].startswith(f"resnetlab zoo build {name}")
        assert meta["categories"] and len(meta["categories"]) == w.num_classes
        assert meta["num_params"] == count_params(resnetlab.create_model(w.arch, num_classes=w.num_classes,
                                                                         in_chans=w.in_chans))
        assert meta["file_size"] == w.file.stat().st_size < MAX_FILE
        assert meta["dataset"] and meta["budget"]["epochs"] >= 1
        test = meta["metrics"]["test"]
        assert 0 < test["top1_acc"] <= 100 and test["count"] > 0 and test["ece"] >= 0
        assert meta["calibration"]["temperature"] > 0  # `zoo build` calibrates before publishing
        total += sum(f.stat().st_size for f in w.folder.iterdir())
    assert total < 4 * MAX_FILE


def test_zoo_recipes_still_train_what_shipped() -> None:
    """`zoo build NAME` trains the config the shipped card records, key for key (recipes move on:
    the zoo recipe pins what made the file). Keys that do not shape the weights may differ: those
    a resumed run may change (device, logging, the final test) and run.* (where the run went)."""
    from resnetlab.config import RESUMABLE_KEYS, leaves

    for name in list_weights():
        r = RECIPES[name]
        stored = dict(leaves(resnetlab.load_config(str(get(name).folder / "train_config.yaml"))))
        rebuilt = dict(leaves(resnetlab.load_config(r.recipe, list(r.overrides))))
        differ = {k: (stored[k], v) for k, v in rebuilt.items()
                  if v != stored[k] and not k.startswith("run.") and k.split("[", 1)[0] not in RESUMABLE_KEYS}
        assert not differ, f"{name}: zoo build would train another config: {differ}"


def test_create_model_with_weights_equals_loading_the_folder() -> None:
    w = get("resnet20.digits")
    model = resnetlab.create_model("resnet20", weights="digits").eval()
    assert model.weights is w or model.weights.name == w.name
    assert model.pretrained_cfg["input_size"] == [1, 8, 8] and model.pretrained_cfg["label_names"] == w.meta["categories"]
    x = w.transforms()(_digit_images())  # [3, 1, 8, 8]
    predictor = resnetlab.load(w.folder, invert="no")  # transforms() never inverts; predict's "auto" may
    assert torch.equal(x, predictor.transforms(_digit_images()))  # the same preprocessing
    with torch.no_grad():
        ours, theirs = model(x), predictor.model(x)
    # predictor's network has BatchNorm folded into the convolutions: float32 re-association only
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * float(ours.abs().max()))
    single = w.transforms()(_digit_images()[0])
    assert single.shape == (1, 8, 8) and torch.equal(single, x[0])


def test_pretrained_true_and_clear_errors() -> None:
    assert resnetlab.create_model("resnet20", pretrained=True).weights.name == "resnet20.digits"
    with pytest.raises(WeightsError, match=r"no pretrained weights ship for 'resnet50'.*resnet20\.digits"):
        resnetlab.create_model("resnet50", pretrained=True)
    with pytest.raises(WeightsError, match="are for resnet20, not resnet56"):
        resnetlab.create_model("resnet56", weights="resnet20.digits")
    with pytest.raises(WeightsError, match="did you mean resnet20.digits"):
        get("resnet20.digit")
    with pytest.raises(TypeError, match=r"resnetlab.create_model\('resnet20', pretrained=True\)"):
        resnetlab.models.create_model("resnet20", pretrained=True)


def test_other_num_classes_keeps_the_backbone() -> None:
    w = get("resnet20.digits")
    model = resnetlab.create_model("resnet20", weights=w, num_classes=3)
    state = w.state_dict()
    own = model.state_dict()
    assert own["fc.weight"].shape == (3, 64)
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("fc."))


def test_list_models_pretrained_and_cli(capsys) -> None:
    assert resnetlab.list_models(pretrained=True) == list_weights()
    assert resnetlab.list_models("resnet2*", pretrained=True) == list_weights("resnet20")
    assert "resnet20" in resnetlab.list_models()
    assert main(["models", "--pretrained"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_weights())
    assert main(["zoo", "recipes"]) == 0
    recipes = capsys.readouterr().out
    assert all(f"{name:<26} {RECIPES[name].command}" in recipes for name in list_weights())
    assert main(["weights", "show", "resnet20.digits"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["metrics"] == get("resnet20.digits").meta["metrics"]


def test_verify_remeasures_the_card(tmp_path: Path, capsys) -> None:
    result = verify("resnet20.digits")
    assert result.ok and result.count == get("resnet20.digits").meta["metrics"]["test"]["count"]
    # a card that claims two images more than the weights get right is caught
    fake = tmp_path / "resnet20.digits"
    shutil.copytree(get("resnet20.digits").folder, fake)
    doc = json.loads((fake / "config.json").read_text())
    doc["resnetlab"]["metrics"]["test"]["top1_acc"] += 2 * 100 / result.count
    (fake / "config.json").write_text(json.dumps(doc))
    assert main(["weights", "verify", str(fake)]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    assert main(["weights", "verify", "resnet20.digits"]) == 0
    assert ": OK" in capsys.readouterr().out


def test_readme_table_is_read_from_the_cards() -> None:
    from resnetlab.weights.zoo import markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- weights-table -->\n")[1].split("<!-- /weights-table -->")[0]
    assert block.strip() == markdown_table(), "regenerate: python -c 'from resnetlab.weights.zoo import markdown_table; print(markdown_table())'"


def test_readme_states_the_shipped_weights_size() -> None:
    """The install section's size of the weights folder is the folder's (MB, one decimal)."""
    import re

    from resnetlab.weights.zoo import FILES

    total = sum(p.stat().st_size for p in Path(FILES).rglob("*") if p.is_file()) / 1e6
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    stated = re.search(r"([0-9.]+) MB in `src/resnetlab/weights/files/`", " ".join(readme.split()))
    assert stated, "README's install section no longer states the size of the shipped weights"
    assert float(stated[1]) == round(total, 1), f"the weights folder holds {total:.2f} MB"


def test_each_architecture_has_one_default_and_pretrained_loads_it() -> None:
    """`resnetlab weights` marks one default per architecture, and it is what pretrained=True loads."""
    from resnetlab.weights.zoo import describe

    rows = describe()
    for arch in {r["arch"] for r in rows}:
        marked = [r["name"] for r in rows if r["arch"] == arch and r["default"]]
        assert len(marked) == 1, (arch, marked)
        model = resnetlab.create_model(arch, pretrained=True)
        assert f"{arch}.{model.pretrained_cfg['tag']}" == marked[0]
    assert [r["name"] for r in rows if r["arch"] == "resnet20" and r["default"]] == ["resnet20.digits"]
