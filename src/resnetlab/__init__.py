"""resnetlab: deep residual networks in PyTorch — build, train, see why, evaluate, export."""

from __future__ import annotations

__version__ = "0.1.0"

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from resnetlab.config import Config, ConfigError, load  # noqa: E402
from resnetlab.models import create_model, list_models  # noqa: E402


def train(config: Config | str | Path | None = None, overrides: tuple[str, ...] | list[str] = (),
          **kwargs: Any):
    """Train as ``resnetlab train`` does; returns :class:`resnetlab.engine.Result`.

    ``config`` is a :class:`Config`, a YAML recipe path, or None for the defaults (resnet20 on
    digits); ``overrides`` are ``key=value`` strings applied on top. Keyword arguments go to
    :func:`resnetlab.engine.fit` (e.g. ``on_step``).
    """
    from resnetlab.config import apply_overrides
    from resnetlab.engine import fit

    cfg = apply_overrides(config, overrides) if isinstance(config, Config) else load(config, overrides)
    return fit(cfg, **kwargs)


__all__ = ["Config", "ConfigError", "__version__", "create_model", "list_models", "load", "train"]
