"""The data source registry: a new dataset is one module plus its recipe, and everything else
(config validation, the dataset's recipe, --help, reproduce's --data, training, evaluation,
prediction's resampling) reads it from the registry. Proved with a throwaway source registered
here alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnetlab.config import DATASET_RECIPES, ConfigError, load
from resnetlab.data import DataError, build_datasets
from resnetlab.data.sources import (
    Source,
    get_source,
    list_sources,
    register_source,
    unregister_source,
)

NAME = "toy_bars"


def _load_toy(cfg, seed: int, needs: frozenset[str]):
    """4 classes of 6x6 grey images: a bright bar in row 0, 2, 3 or 5 (plus noise)."""
    from resnetlab.data.splits import from_train_test

    rng = np.random.default_rng(123)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = np.arange(n) % 4
        x = rng.integers(0, 40, (n, 1, 6, 6)).astype(np.uint8)
        x[np.arange(n), 0, np.array([0, 2, 3, 5])[y], :] = 250
        return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))

    return from_train_test(cfg, seed, *make(160), *make(40), classes=("top", "upper", "lower", "bottom"))


@pytest.fixture
def toy_source(tmp_path: Path) -> Iterator[Source]:
    """The whole of a new dataset: a Source (what its module would register) and its recipe."""
    recipe = tmp_path / "toy_bars.yaml"
    recipe.write_text("# toy_bars: tiny recipe\nmodel: {name: resnet20}\n"
                      "data: {name: toy_bars, val_fraction: 0.2, augment: {crop_padding: 0, flip: false}}\n"
                      "optim: {lr: 0.05, schedule: constant}\ntrain: {epochs: 1, batch_size: 32}\n")
    source = register_source(Source(
        name=NAME, summary="bars on noise, a test's dataset", load=_load_toy, in_chans=1,
        image_size=(6, 6), classes=("top", "upper", "lower", "bottom"), eval_resample="box",
        recipe=recipe,
    ))
    try:
        yield source
    finally:
        unregister_source(NAME)


def test_builtin_sources_declare_what_the_rest_reads() -> None:
    names = [s.name for s in list_sources()]
    assert {"digits", "cifar10", "cifar100", "folder", "fashion_mnist", "mnist", "kmnist"} <= set(names)
    for s in list_sources():
        assert s.summary and s.files and callable(s.load), s.name
        assert DATASET_RECIPES[s.name] == s.name  # each ships its packaged recipe
        assert load(None, [f"data.name={s.name}", *(["data.root=/x"] if s.needs_root else [])]
                    ).data.name == s.name
    assert get_source("digits").eval_resample == "box" and get_source("folder").split_folders


def test_a_new_source_is_one_registration_plus_its_recipe(toy_source: Source, tmp_path: Path,
                                                          capsys) -> None:
    # config: known, its recipe applied first, did-you-mean for a typo
    cfg = load(None, [f"data.name={NAME}", f"run.root={tmp_path}", "train.device=cpu",
                      "train.quiet=true", "train.tensorboard=false"])
    assert cfg.run.recipe == str(toy_source.recipe) and cfg.optim.schedule == "constant"
    assert cfg.data.augment.crop_padding == 0 and cfg.train.epochs == 1
    with pytest.raises(ConfigError, match=r"did you mean 'toy_bars'\?"):
        load(None, ["data.name=toy_barz"])
    # --help and reproduce's --data choices list it
    from resnetlab.analysis.degradation import data_choices
    from resnetlab.cli import main

    assert NAME in data_choices()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "toy_bars: bars on noise" in capsys.readouterr().out.replace("\n", " ")

    # train, evaluate and predict with nothing else told about it
    import resnetlab
    from resnetlab.data import normalize
    from resnetlab.evaluate import evaluate_checkpoint
    from resnetlab.predict import Predictor

    result = resnetlab.train(cfg)
    ds = build_datasets(cfg.data, seed=0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (128, 32, 40) and ds.meta.in_chans == 1
    report = evaluate_checkpoint(result.run_dir, "test", write=False)
    assert report.metrics["count"] == 40 and report.classes == ["top", "upper", "lower", "bottom"]
    predictor = Predictor.from_path(result.run_dir, device="cpu")
    # a 12x12 picture of the bottom bar, box-resampled to 6x6 as the source declares: each output
    # pixel is the mean of a 2x2 block, so row 5 is exactly 250 and the rest exactly 0 (a
    # bilinear filter's wider support would bleed into row 4)
    big = np.zeros((12, 12), np.uint8)
    big[10:, :] = 250
    small = torch.zeros(1, 1, 6, 6, dtype=torch.uint8)
    small[..., 5, :] = 250
    assert torch.equal(predictor.transforms(Image.fromarray(big, "L")), normalize(small, predictor.meta))


def test_unregistered_name_is_a_data_error_naming_the_key() -> None:
    from resnetlab.config import DataConfig

    with pytest.raises(DataError, match=r"^data\.name: unknown data source 'nope'"):
        build_datasets(DataConfig(name="nope"), seed=0)
