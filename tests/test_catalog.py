"""The shipped model catalog (models/catalog.json) is what counting the models gives today."""

from __future__ import annotations

import pytest
import torch

from resnetlab.catalog import (
    CATALOG_FILE,
    REGENERATE,
    cached_rows,
    models_fingerprint,
    read_catalog,
)
from resnetlab.models import count_macs, count_params, create_model, list_models, model_table

STALE = f"models/catalog.json is stale: a model file changed; regenerate it with `{REGENERATE}`"


def test_catalog_is_fresh_and_lists_every_registered_model() -> None:
    doc = read_catalog()
    assert doc is not None, f"{CATALOG_FILE} is missing or unreadable; write it with `{REGENERATE}`"
    assert doc["fingerprint"] == models_fingerprint(), STALE
    assert [r["name"] for r in cached_rows("*")] == list_models(), STALE


@pytest.mark.parametrize("name", ["resnet20", "plain20", "resnet56", "preact_resnet18", "resnet18"])
def test_catalog_counts_equal_a_fresh_count(name: str) -> None:
    """Recount a few (cheap, on the meta device) and compare: the cache cannot drift silently."""
    (row,) = cached_rows(name)
    with torch.device("meta"):
        model = create_model(name)
    assert row["params"] == count_params(model)
    assert row["macs"] == count_macs(model)
    assert row["input_size"] == tuple(model.input_size)
    assert model_table(name, use_catalog=False) == [row]
