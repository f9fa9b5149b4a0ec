"""Data sources, one module per dataset (digits, cifar, folder, idx: fashion_mnist, mnist,
kmnist), collected by :mod:`resnetlab.data.sources.registry`.

A new dataset is a module here that calls :func:`register_source` with a :class:`Source`
(its name, files, image size, channels, classes, evaluation resampling, default recipe and
loader), plus its recipe YAML in ``resnetlab/recipes/``. Importing this package is cheap: the
modules import torch only inside their loaders.
"""

from resnetlab.data.sources.registry import (
    Source,
    UnknownSourceError,
    find_source,
    get_source,
    list_sources,
    register_source,
    source_names,
    unregister_source,
)

__all__ = ["Source", "UnknownSourceError", "find_source", "get_source", "list_sources",
           "register_source", "source_names", "unregister_source"]
