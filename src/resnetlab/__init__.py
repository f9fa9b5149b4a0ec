"""resnetlab: deep residual networks in PyTorch — build, train, see why, evaluate, export.

Importing the package is cheap (no torch): the names below load their modules on first use, so
``resnetlab --help`` and ``resnetlab models`` answer in well under a second.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resnetlab.version import __version__

if TYPE_CHECKING:
    from resnetlab.config import Config
    from resnetlab.engine import Result
    from resnetlab.predict import Predictor

# name -> module that defines it; resolved by __getattr__ on first use (PEP 562)
_LAZY = {
    "Config": "resnetlab.config",
    "ConfigError": "resnetlab.config",
    "load_config": "resnetlab.config",
    "create_model": "resnetlab.weights",  # the registry's, plus weights= / pretrained=
    "list_models": "resnetlab.weights",
    "Predictor": "resnetlab.predict",
}


def __getattr__(name: str) -> Any:
    if name == "weights":  # resnetlab.weights.get("resnet20.digits") after a bare `import resnetlab`
        return importlib.import_module("resnetlab.weights")
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = getattr(module, "load" if name == "load_config" else name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'resnetlab' has no attribute {name!r}")


def _is_config_source(source: Any) -> bool:
    """True for what :func:`resnetlab.config.load` reads: None, a .yaml file, a recipe name."""
    if source is None:
        return True
    text = str(source)
    if text.endswith((".yaml", ".yml")):
        return True
    from resnetlab.config import recipe_names

    return not Path(text).expanduser().exists() and Path(text).name in recipe_names()


def load(source: str | Path | None = None, overrides: Iterable[str] | Mapping[str, Any] | None = None,
         **kwargs: Any) -> Predictor:
    """A trained network ready to predict: ``p = resnetlab.load("runs/digits")``.

    ``source`` is a run folder, a ``.pt`` checkpoint or an exported ``.safetensors`` file; the
    returned :class:`~resnetlab.predict.Predictor` has ``.model``, ``.classes``, ``.transforms``
    and ``.predict(images, topk=5)``. Keyword arguments (``device``, ``invert``) go to it.

    Configs come from :func:`resnetlab.load_config`. A config source here (None, a ``.yaml``
    path or a recipe name, or any call with ``overrides``) still returns the Config, with a
    FutureWarning: that form goes away in a later release.
    """
    if source is None or overrides is not None or _is_config_source(source):
        from resnetlab.config import load as load_config

        warnings.warn("resnetlab.load() of a config is deprecated and will return only Predictors; "
                      "use resnetlab.load_config(recipe, overrides)", FutureWarning, stacklevel=2)
        return load_config(source, overrides if overrides is not None else ())  # type: ignore[return-value]
    from resnetlab.predict import Predictor

    return Predictor.from_path(source, **kwargs)


def _ensure_logging() -> None:
    """Progress lines reach scripts and notebooks: one stderr handler when none is set up."""
    logger = logging.getLogger("resnetlab")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def train(config: Config | str | Path | Mapping[str, Any] | None = None,
          overrides: Iterable[str] | Mapping[str, Any] | None = (),
          *, on_step: Callable[[dict[str, Any]], bool | None] | None = None,
          **sections: Any) -> Result:
    """Train as ``resnetlab train`` does; returns :class:`resnetlab.engine.Result`.

    ``config``: a :class:`Config`, a recipe (packaged name such as ``"digits_resnet20"`` or a
    YAML path), a dict of values, or None (the dataset's recipe: resnet20 on digits).
    ``overrides``: ``["train.epochs=5"]`` or ``{"train.epochs": 5}``; a bare string is refused.
    Keyword overrides by section: ``train={"epochs": 5}, optim={"lr": 0.05}, seed=1``.
    ``on_step(info)`` is called after every optimiser step (see :func:`resnetlab.engine.fit`).
    Progress is logged (a stderr handler is added when logging is not configured).
    """
    from resnetlab.config import Config, ConfigError, apply_overrides, flatten, override_pairs
    from resnetlab.config import load as load_config

    pairs = override_pairs(overrides)
    bad = [k for k in sections if k not in ("model", "data", "optim", "train", "run", "seed")]
    if bad:
        raise ConfigError(f"resnetlab.train(): unknown keyword {bad[0]!r}; keyword overrides are the "
                          f"sections model, data, optim, train, run (dicts) and seed")
    pairs += override_pairs(dict(flatten(sections)))
    overrides_map = dict(pairs)
    if isinstance(config, Config):
        cfg = apply_overrides(config, overrides_map)
    elif isinstance(config, Mapping):
        cfg = load_config(None, {**dict(flatten(config)), **overrides_map})
    else:
        cfg = load_config(config, overrides_map)
    _ensure_logging()
    from resnetlab.launch import fit_cleanly

    return fit_cleanly(cfg, on_step=on_step)


__all__ = ["Config", "ConfigError", "Predictor", "__version__", "create_model", "list_models", "load",
           "load_config", "train"]
