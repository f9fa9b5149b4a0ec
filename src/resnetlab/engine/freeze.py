"""``train.freeze``: keep parts of a network fixed while the rest trains.

Prefixes name modules by their attribute path (``layer1``, ``layer2.0``, ``fc``) plus two
groups: ``stem`` (everything before the first stage: ``conv1``, ``bn1``) and ``backbone``
(everything but the classifier: linear probing). The stages and the classifier are the ones the
model declares (``stage_names``, ``get_classifier``), whatever the family calls them. A frozen parameter has
``requires_grad=False``, so it gets no gradient, and the optimiser (which skips parameters
without a gradient) applies neither an update nor weight decay to it. A frozen BatchNorm layer
stays in eval mode even while the model trains: it normalises with its running statistics and
never updates them (a forward pre-hook re-asserts eval mode, so ``model.train()`` anywhere
cannot undo it, and the hook travels with ``copy.deepcopy`` for EMA).

Two-phase fine-tuning sets ``train.unfreeze_at_epoch=E``: the freeze holds for epochs
``[0, E)`` and everything trains from epoch ``E`` on. :func:`freeze_for_epoch` is a pure
function of the config and the epoch, so a resumed run freezes exactly as the straight one did.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from resnetlab.config import ConfigError, TrainConfig
from resnetlab.models.base import classifier_name, stage_names

GROUPS = ("stem", "backbone")
_FROZEN_ATTR = "_resnetlab_frozen_bn"  # True: keep this BN in eval mode during training


def _top_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_children()]


def stem_names(model: nn.Module) -> list[str]:
    """Modules before the first stage (``conv1``, ``bn1``, ``relu``, ``maxpool``): the siblings
    registered before it, at every level of its path (``features.conv0`` for a DenseNet)."""
    out: list[str] = []
    stages = stage_names(model)
    if not stages:
        return out
    module, prefix = model, ""
    for part in stages[0].split("."):
        for name, _ in module.named_children():
            if name == part:
                break
            out.append(prefix + name)
        module, prefix = module.get_submodule(part), f"{prefix}{part}."
    return out


def all_but(model: nn.Module, path: str) -> list[str]:
    """Module paths that together cover every module of ``model`` except ``path`` (and the
    modules that hold it): the siblings at every level of ``path``."""
    out: list[str] = []
    module, prefix = model, ""
    for part in path.split("."):
        out += [prefix + name for name, _ in module.named_children() if name != part]
        module, prefix = module.get_submodule(part), f"{prefix}{part}."
    return out


def expand_prefixes(model: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """``stem``/``backbone`` -> module paths; every prefix must name a module of ``model``.

    Raises ConfigError naming the unknown prefix and the valid top-level names.
    """
    modules = dict(model.named_modules())
    out: list[str] = []
    for p in prefixes:
        if p == "backbone":
            out += all_but(model, classifier_name(model))
        elif p == "stem":
            out += stem_names(model)
        elif p in modules and p != "":
            out.append(p)
        else:
            valid = ", ".join([*GROUPS, *_top_names(model)])
            raise ConfigError(f"train.freeze: {p!r} names no module of the model; use one of {valid} "
                              "or a dotted path such as layer1.0")
    return out


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _keep_eval(module: nn.Module, _args: object) -> None:
    # Forward pre-hook: a frozen BN normalises with its running statistics and leaves them alone.
    if getattr(module, _FROZEN_ATTR, False):
        module.training = False


def set_frozen(model: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """Freeze the modules under ``prefixes`` (already expanded) and unfreeze everything else.

    Returns the names of the frozen parameters. Idempotent; call it again on the module that
    trains after SyncBN conversion replaced BN layers.
    """
    frozen = []
    for name, p in model.named_parameters():
        is_frozen = _under(name, prefixes)
        p.requires_grad_(not is_frozen)
        if is_frozen:
            frozen.append(name)
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            if not hasattr(m, _FROZEN_ATTR):
                m.register_forward_pre_hook(_keep_eval)
            setattr(m, _FROZEN_ATTR, _under(name, prefixes))
    return frozen


def freeze_prefixes_at(cfg: TrainConfig, epoch: int) -> tuple[str, ...]:
    """The prefixes frozen during ``epoch`` (0-based): ``train.freeze`` before
    ``train.unfreeze_at_epoch``, none from then on."""
    if cfg.unfreeze_at_epoch is not None and epoch >= cfg.unfreeze_at_epoch:
        return ()
    return tuple(cfg.freeze)


def freeze_for_epoch(model: nn.Module, cfg: TrainConfig, epoch: int) -> bool:
    """Apply the freeze that ``epoch`` calls for; True when the set of trainable parameters
    changed (a DDP wrapper must then be rebuilt: it only reduces the gradients it was built
    with)."""
    before = [p.requires_grad for p in model.parameters()]
    set_frozen(model, expand_prefixes(model, freeze_prefixes_at(cfg, epoch)))
    return before != [p.requires_grad for p in model.parameters()]


def frozen_bn_eval(model: nn.Module) -> None:
    """Put frozen BN layers in eval mode now (the pre-hook does it at every forward too)."""
    for m in model.modules():
        if getattr(m, _FROZEN_ATTR, False):
            m.training = False


__all__ = ["all_but", "expand_prefixes", "freeze_for_epoch", "freeze_prefixes_at", "frozen_bn_eval",
           "set_frozen", "stem_names"]
