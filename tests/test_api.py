"""The Python API's entry points: ``resnetlab.load`` opens trained networks, configs come from
``resnetlab.load_config`` (the old config form of ``load`` warns before it goes away)."""

from __future__ import annotations

import warnings

import pytest

import resnetlab
from resnetlab.config import Config


def test_load_config_returns_a_config_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = resnetlab.load_config("digits_resnet20", ["train.epochs=3"])
    assert isinstance(cfg, Config) and cfg.train.epochs == 3


def test_load_of_a_recipe_still_works_but_warns_that_it_goes_away() -> None:
    with pytest.warns(FutureWarning, match="use resnetlab.load_config"):
        cfg = resnetlab.load("digits_resnet20")
    assert isinstance(cfg, Config) and cfg.model.name == "resnet20"
