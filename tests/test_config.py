"""Config: defaults <- YAML <- key=value, type checks, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from resnetlab.config import Config, ConfigError, apply_overrides, from_dict, load, to_dict

ROOT = Path(__file__).resolve().parents[1]


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
    recipes = sorted((ROOT / "configs").glob("*.yaml"))
    names = {p.stem for p in recipes}
    assert {"digits_resnet20", "cifar10_resnet20", "cifar10_resnet56", "cifar10_resnet110",
            "cifar100_resnet56", "imagenet_resnet50"} <= names
    for path in recipes:
        cfg = load(path)
        assert cfg.model.name in path.stem
    paper = load(ROOT / "configs/cifar10_resnet110.yaml")
    assert (paper.optim.lr, paper.optim.momentum, paper.optim.weight_decay) == (0.1, 0.9, 1e-4)
    assert paper.optim.warmup == "constant" and paper.optim.warmup_lr == 0.01


def test_zero_init_residual_is_refused_for_plain_nets() -> None:
    assert load(None, ["model.zero_init_residual=true"]).model.zero_init_residual
    with pytest.raises(ConfigError, match="plain20"):
        load(None, ["model.name=plain20", "model.zero_init_residual=true"])
