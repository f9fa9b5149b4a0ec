"""``build_datasets``: the source ``data.name`` names, loaded, split and cut to the config's
classes and sizes. Its own module, above the containers (:mod:`resnetlab.data.datasets`) and the
subset selection (:mod:`resnetlab.data.subset`) that both build on them, so no import goes round.
"""

from __future__ import annotations

from collections.abc import Collection

from resnetlab.config import DataConfig
from resnetlab.data.datasets import SPLITS, Datasets
from resnetlab.data.errors import DataError
from resnetlab.data.sources.registry import UnknownSourceError, get_source
from resnetlab.data.subset import select_subset


def build_datasets(cfg: DataConfig, seed: int, needs: Collection[str] = SPLITS) -> Datasets:
    """Load the source named by ``cfg.name`` (the registry's) and split it; the split depends
    only on ``seed`` and the fractions in ``cfg``. Raises :class:`DataError` naming the file or
    folder at fault.

    ``needs``: the splits the caller will read; a source may skip work for the others (image
    folders decode only those splits' files up front with ``data.check_images=true``).
    """
    unknown = set(needs) - set(SPLITS)
    if unknown:
        raise ValueError(f"needs: unknown split(s) {sorted(unknown)}; splits are {SPLITS}")
    try:
        source = get_source(cfg.name)
    except UnknownSourceError as e:
        raise DataError(f"data.name: {e}") from None
    data = source.load(cfg, seed, frozenset(needs))
    return select_subset(data, cfg, seed)  # data.classes / data.train_per_class


__all__ = ["build_datasets"]
