"""Typed, frozen configuration: defaults <- dataset recipe <- ``-c`` recipe <- ``key=value``.

Every value carries its unit and reason in a comment (``resnetlab config keys`` lists them).
``load()`` builds a :class:`Config`: the dataclass defaults, then the packaged recipe of the
dataset that ``data.name`` ends up naming (``recipes/digits.yaml`` ...), then the ``-c`` recipe
(a packaged name such as ``cifar10_resnet56`` or a YAML path), then the overrides; the recipes
applied are recorded in ``run.recipe``. ``validate()`` checks cross-field rules, and unknown keys
are refused with the closest valid key named, so a typo such as ``optim.lr_rate=0.1`` never
silently trains with the default.

One module per concern, each importing only those above it; import every name from here:

- :mod:`~resnetlab.config.schema`: the dataclasses, their keys, types, defaults and comments;
- :mod:`~resnetlab.config.checks`: :func:`validate` and what may change on resume;
- :mod:`~resnetlab.config.typed`: plain data -> dataclasses, type-checked, unknown keys refused;
- :mod:`~resnetlab.config.overrides`: ``key=value`` words -> checked pairs, applied in order;
- :mod:`~resnetlab.config.recipes`: the packaged recipes and :func:`load`.
"""

from __future__ import annotations

from resnetlab.config.checks import (
    BOUNDS,
    NAME_MAX,
    RESUMABLE_KEYS,
    data_source,
    resume_changes,
    run_name_problem,
    validate,
)
from resnetlab.config.overrides import (
    NULL_WORDS,
    Overrides,
    apply_overrides,
    apply_pairs,
    flatten,
    override_pairs,
    parse_override,
)
from resnetlab.config.recipes import (
    DATASET_RECIPES,
    RECIPE_DIR,
    list_recipes,
    load,
    recipe_description,
    recipe_names,
    recipe_path,
)
from resnetlab.config.schema import (
    AugmentConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    all_keys,
    describe_keys,
    describe_type,
    field_types,
    getattr_dotted,
    leaves,
    to_dict,
)
from resnetlab.config.typed import (
    FOREIGN_KEYS,
    RENAMED,
    build_dataclass,
    from_dict,
    renamed_key,
    unknown_key_error,
)

__all__ = [
    "AugmentConfig", "Config", "apply_overrides", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig",
    "RunConfig", "TrainConfig", "from_dict", "load", "parse_override",
    "to_dict", "validate", "DATASET_RECIPES", "RECIPE_DIR", "describe_keys", "list_recipes",
    "override_pairs", "recipe_names", "recipe_path", "BOUNDS", "RESUMABLE_KEYS", "run_name_problem",
    "resume_changes", "getattr_dotted", "flatten", "all_keys",
    "FOREIGN_KEYS", "NAME_MAX", "NULL_WORDS", "Overrides", "RENAMED", "apply_pairs", "build_dataclass",
    "data_source", "describe_type", "field_types", "leaves", "recipe_description", "renamed_key",
    "unknown_key_error",
]
