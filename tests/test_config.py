"""Config: defaults <- YAML <- key=value, type checks, and errors that name the key."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from resnetlab.config import (
    DATASET_RECIPES,
    RECIPE_DIR,
    Config,
    ConfigError,
    apply_overrides,
    describe_keys,
    from_dict,
    load,
    to_dict,
)


def test_defaults_yaml_then_overrides(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: resnet56}\noptim: {lr: 0.05}\ntrain: {epochs: 7}\n")
    cfg = load(recipe, ["optim.lr=0.02", "seed=3", "optim.milestones=[0.3,0.6]"])
    assert cfg.model.name == "resnet56"  # from YAML
    assert cfg.optim.lr == 0.02  # override wins over YAML
    assert cfg.train.epochs == 7
    assert cfg.seed == 3
    assert cfg.optim.milestones == (0.3, 0.6)
    assert cfg.train.batch_size == Config().train.batch_size  # untouched default


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optim.lr_rate=0.1", "optim.lr"),  # unknown key: closest named
        ("trian.epochs=3", "train.epochs"),
        ("train.epochs=three", "train.epochs"),  # wrong type: key named
        ("train.epochs=2.5", "train.epochs"),
        ("optim.schedule=cosin", "cosine"),  # bad choice: nearest choice named
        ("model.name=resnet57", "resnet56"),  # unknown model: closest named
        ("train.amp=yes", "train.amp"),
        ("optim.lr=-1", "optim.lr"),
        ("data.name=cifar10", "data.root"),  # cifar without a folder
        ("nokey", "key=value"),
        ("model.recompute_every=-1", "model.recompute_every"),
        ("model.recompute_stages=4", "model.recompute_stages"),  # resnet20 has 3 stages
    ],
)
def test_bad_override_names_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load(None, [override])


def test_yaml_with_wrong_type_names_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  batch_size: lots\n")
    with pytest.raises(ConfigError) as e:
        load(bad)
    assert str(bad) in str(e.value) and "train.batch_size" in str(e.value)


def test_yaml_unknown_nested_key_and_broken_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text("optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.weight_decay"):
        load(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(broken)
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.yaml")


def test_round_trip_through_dict() -> None:
    cfg = load(None, ["optim.ema_decay=0.99", "model.shortcut=B", "data.augment.flip=false"])
    again = from_dict(to_dict(cfg))
    assert again == cfg
    assert apply_overrides(cfg, ["seed=5"]).seed == 5 and cfg.seed == 0  # frozen: a new object


def test_every_shipped_recipe_loads() -> None:
    recipes = sorted(RECIPE_DIR.glob("*.yaml"))
    names = {p.stem for p in recipes}
    assert {"digits_resnet20", "cifar10_resnet20", "cifar10_resnet56", "cifar10_resnet110",
            "cifar100_resnet56", "imagenet_resnet50", *DATASET_RECIPES.values()} <= names
    for path in recipes:
        cfg = load(path, ["data.root=/nowhere"] if path.stem in ("cifar10", "cifar100", "folder") else [])
        if path.stem.startswith("finetune_"):  # fine-tuning recipes: any net, the backbone frozen first
            assert "backbone" in cfg.train.freeze
        elif path.stem == "fashion_speedrun":  # a task recipe (time to 93%): the net is its own choice
            assert cfg.data.name == "fashion_mnist" and cfg.model.name
        else:
            assert cfg.model.name in path.stem or path.stem in DATASET_RECIPES.values()
    paper = load("cifar10_resnet110")
    assert (paper.optim.lr, paper.optim.momentum, paper.optim.weight_decay) == (0.1, 0.9, 1e-4)
    assert paper.optim.warmup == "constant" and paper.optim.warmup_lr == 0.01


def test_zero_init_residual_is_refused_for_plain_nets() -> None:
    assert load(None, ["model.zero_init_residual=true"]).model.zero_init_residual
    with pytest.raises(ConfigError, match="plain20"):
        load(None, ["model.name=plain20", "model.zero_init_residual=true"])


# ---------------------------------------------------------------------------------------------
# recipes: packaged, chosen per dataset, recorded


def test_bare_config_is_the_make_train_recipe() -> None:
    """`resnetlab train` alone and `make train` (-c digits_resnet20) resolve to the same run."""
    bare, make = load(None), load("digits_resnet20")
    assert replace(bare, run=replace(bare.run, recipe=None)) == replace(make, run=replace(make.run, recipe=None))
    assert bare.run.recipe == "digits" and make.run.recipe == "digits <- digits_resnet20"
    assert bare.data.augment.flip is False and bare.data.augment.crop_padding == 1
    assert bare.optim.schedule == "cosine" and bare.optim.warmup == "linear"


@pytest.mark.parametrize(("data", "extra", "expect"), [
    ("cifar10", ["data.root=/x"], {"flip": True, "crop": 4, "schedule": "step", "epochs": 182}),
    ("cifar100", ["data.root=/x"], {"flip": True, "crop": 4, "schedule": "step", "epochs": 182}),
    ("folder", ["data.root=/x"], {"flip": True, "schedule": "step", "epochs": 90, "batch": 256}),
])
def test_each_dataset_brings_its_recipe(data: str, extra: list[str], expect: dict) -> None:
    cfg = load(None, [f"data.name={data}", *extra])
    assert cfg.run.recipe == data
    assert cfg.data.augment.flip is expect["flip"] and cfg.optim.schedule == expect["schedule"]
    assert cfg.train.epochs == expect["epochs"]
    assert cfg.data.augment.crop_padding == expect.get("crop", cfg.data.augment.crop_padding)
    assert cfg.train.batch_size == expect.get("batch", 128)


def test_layering_file_then_overrides_win_over_the_dataset_recipe(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text("data: {name: digits, augment: {flip: true}}\ntrain: {epochs: 4}\n")
    cfg = load(mine, ["train.epochs=6"])
    assert cfg.data.augment.flip is True  # the user asked for flips
    assert cfg.train.epochs == 6 and cfg.optim.schedule == "cosine"  # digits recipe underneath
    assert cfg.run.recipe == f"digits <- {mine}"
    # a recipe that switches dataset gets that dataset's recipe underneath, not digits'
    assert load("cifar10_resnet56").run.recipe == "cifar10 <- cifar10_resnet56"
    # a saved config.yaml keeps its own record when loaded again (resume)
    saved = tmp_path / "config.yaml"
    saved.write_text(__import__("yaml").safe_dump(to_dict(load("digits_resnet20"))))
    assert load(saved).run.recipe == "digits <- digits_resnet20"


def test_recipe_by_name_works_from_any_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load("cifar10_resnet56", ["data.root=/x"]).model.name == "resnet56"
    assert load("cifar10_resnet56.yaml", ["data.root=/x"]).model.name == "resnet56"
    with pytest.raises(ConfigError, match="-c digits_resnet20"):
        load("configs/digits_resnet20.yaml")  # the old path: named, with the new spelling
    with pytest.raises(ConfigError, match="digits_resnet20"):
        load("digits_resnet2")  # a typo: nearest recipe named


def test_overrides_as_dict_and_bare_string_refused() -> None:
    assert load(None, {"train.epochs": 3, "optim": {"lr": 0.02}}).optim.lr == 0.02
    with pytest.raises(ConfigError, match=r"not the string 'train.epochs=3'"):
        load(None, "train.epochs=3")
    with pytest.raises(ConfigError, match="model.init_from"):
        load(None, ["model.pretrained=true"])  # timm's habit: pointed at weights loading


def test_every_key_is_described() -> None:
    rows = describe_keys()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) and {"optim.lr", "data.augment.flip", "seed", "run.recipe"} <= set(keys)
    lr = next(r for r in rows if r["key"] == "optim.lr")
    assert lr["type"] == "float" and lr["default"] == Config().optim.lr and "learning rate" in lr["comment"]
    flip = next(r for r in rows if r["key"] == "data.augment.flip")
    assert "mirrored" in flip["comment"]
