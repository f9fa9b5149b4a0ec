"""``ModelSpec``: the options every registered network takes, their checks, and the call.

The one source of truth for model options: ``resnetlab.config.ModelConfig`` derives from it
(its YAML keys are these fields, plus the fine-tuning ones), its ``validate()`` runs
:meth:`ModelSpec.check`, and :func:`resnetlab.models.build_model` passes the fields to
``create_model`` through :meth:`ModelSpec.create_kwargs`. Importing this module needs no torch.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from typing import Any, Literal

MAX_CLASSES = 1_000_000  # far above any real label set (ImageNet-21k: 21,841); a typo guard
MAX_CHANNELS = 64  # input channels: images have 1-4; a guard against typos


class ModelSpecError(ValueError):
    """A model option is wrong; the message names the option (with the caller's prefix)."""


@dataclass(frozen=True)
class ModelSpec:
    name: str = "resnet20"  # registry name: see `resnetlab models`
    num_classes: int | None = None  # None: taken from the dataset
    in_chans: int | None = None  # None: taken from the dataset (1 for digits, 3 for CIFAR)
    shortcut: Literal["A", "B", "C"] | None = None  # None: the registry's (A for CIFAR nets)
    zero_init_residual: bool = False  # last BN of each residual branch starts at 0
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory
    # Activation recomputation (grad_checkpointing), not checkpoint files: hence "recompute_*";
    # the models' own (timm-style) argument names are in each field's metadata "arg".
    recompute_every: int = field(default=0, metadata={"arg": "checkpoint_every"})  # blocks per recomputed segment; 0 = about sqrt(stage blocks)
    recompute_stages: int | None = field(default=-1, metadata={"arg": "checkpoint_stages"})  # recompute stages[:n]; -1 = all but the last; None = all
    drop_rate: float = 0.0  # dropout before the classifier, probability

    def check(self, prefix: str = "") -> None:
        """Raise :class:`ModelSpecError` naming ``prefix + option`` for the first bad option.

        Needs the registry (imports torch): the name must be registered, and some options
        depend on the variant (plain nets have no residual branch; the stage count).
        """
        from .registry import list_models, model_defaults

        def need(ok: bool, key: str, msg: str) -> None:
            if not ok:
                raise ModelSpecError(f"{prefix}{key} {msg}")

        if self.num_classes is not None:
            need(1 <= self.num_classes <= MAX_CLASSES, "num_classes",
                 f"must be in [1, {MAX_CLASSES}], got {self.num_classes}")
        if self.in_chans is not None:
            need(1 <= self.in_chans <= MAX_CHANNELS, "in_chans",
                 f"must be in [1, {MAX_CHANNELS}], got {self.in_chans}")
        need(0 <= self.drop_rate < 1, "drop_rate", "must be in [0, 1)")
        need(self.recompute_every >= 0, "recompute_every",
             f"must be >= 0 (0 = auto), got {self.recompute_every}")
        names = list_models()
        if self.name not in names:
            close = difflib.get_close_matches(self.name, names, n=3)
            hint = f"; closest: {', '.join(close)}" if close else "; see `resnetlab models`"
            raise ModelSpecError(f"{prefix}name: unknown model {self.name!r}{hint}")
        defaults = model_defaults(self.name)
        need(not (self.zero_init_residual and defaults.get("plain")), "zero_init_residual",
             f"=true would make every block of the plain net {self.name} output zeros; "
             "it is for residual nets only")
        stages, n = self.recompute_stages, len(defaults.get("layers", ()))
        # families registered without a ``layers`` count check recompute_stages when built
        need(not n or stages is None or -n <= stages <= n, "recompute_stages",
             f"must be null (all) or in [{-n}, {n}] for the {n}-stage {self.name}, got {stages}")

    def create_kwargs(self, num_classes: int, in_chans: int) -> dict[str, Any]:
        """Keyword arguments for ``create_model(self.name, ...)``: every option of this spec
        under the model's argument name; ``num_classes``/``in_chans`` fill the unset ones
        (the dataset's), an unset ``shortcut`` keeps the registry's."""
        kw: dict[str, Any] = {}
        for f in fields(ModelSpec):  # ModelSpec's own options, not a subclass's extras
            value = getattr(self, f.name)
            if f.name == "name" or (f.name == "shortcut" and value is None):
                continue
            kw[f.metadata.get("arg", f.name)] = value
        kw["num_classes"] = self.num_classes or num_classes
        kw["in_chans"] = self.in_chans or in_chans
        return kw


__all__ = ["MAX_CHANNELS", "MAX_CLASSES", "ModelSpec", "ModelSpecError"]
