"""config.validate(): values that parse but make no sense are refused up front, naming the key."""

from __future__ import annotations

import pytest

import resnetlab
from resnetlab.config import ConfigError


@pytest.mark.parametrize("override, key", [
    ("optim.gamma=-0.1", "optim.gamma"),
    ("optim.lr=.nan", "optim.lr"),
    ("optim.lr=.inf", "optim.lr"),
    ("optim.weight_decay=.nan", "optim.weight_decay"),
    ("optim.momentum=.nan", "optim.momentum"),
    ("optim.momentum=-0.9", "optim.momentum"),
    ("optim.momentum=1.5", "optim.momentum"),
    ("optim.warmup_lr=-1", "optim.warmup_lr"),
    ("optim.min_lr=-0.01", "optim.min_lr"),
    ("optim.milestones=[0.5, .nan]", "optim.milestones[1]"),
    ("train.threads=-2", "train.threads"),
    ("train.sync_every=-1", "train.sync_every"),
    ("seed=-1", "seed"),
    (f"seed={2**64}", "seed"),
    ("model.num_classes=10000000000", "model.num_classes"),
    ("model.in_chans=0", "model.in_chans"),
    ("model.in_chans=100000", "model.in_chans"),
])
def test_nonsense_values_are_refused_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        resnetlab.load_config(None, [override])
    assert str(e.value).startswith(key), str(e.value)


def test_sane_values_still_pass() -> None:
    cfg = resnetlab.load_config(None, ["optim.gamma=0.2", "optim.momentum=0", "seed=18446744073709551615",
                                "model.num_classes=21841", "train.threads=2"])
    assert cfg.seed == 2**64 - 1


@pytest.mark.parametrize("override, message", [
    ("model.num_classes=7", "model.num_classes=7 does not match the data: digits has 10 classes"),
    ("model.in_chans=3", "model.in_chans=3 does not match the data"),
])
def test_model_options_that_do_not_match_the_data_are_refused(quick: list[str], override: str,
                                                              message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resnetlab.train(None, [*quick, "run.name=mismatch", override])


def test_old_activation_checkpointing_keys_still_work_with_a_warning(caplog) -> None:
    from resnetlab.config import from_dict

    cfg = resnetlab.load_config(None, ["model.checkpoint_every=2", "model.checkpoint_stages=null"])
    assert cfg.model.recompute_every == 2 and cfg.model.recompute_stages is None
    assert "model.checkpoint_every is now model.recompute_every" in caplog.text
    # a config stored in an older checkpoint
    old = from_dict({"model": {"name": "resnet20", "checkpoint_every": 3, "checkpoint_stages": 1}})
    assert (old.model.recompute_every, old.model.recompute_stages) == (3, 1)
