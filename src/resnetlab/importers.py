"""``resnetlab import torchvision``: a torchvision state dict on disk -> a resnetlab checkpoint.

For people who have weights but no network access (no ``weights=`` download): the ImageNet
nets here use torchvision's parameter names, so the state dict loads unchanged. The checkpoint
gets what training would have stored (config + data meta), so ``eval``, ``predict`` and
``export`` accept it like any run. The data meta is ImageNet-style: image-folder data, shorter
side 256, centre crop 224, ImageNet mean/std; class names from ``--classes``, else from the
source (a timm/Hugging Face ``config.json`` beside the file, or torchvision's ImageNet categories
for 1000 classes), else ``"0".."k-1"``. Before writing, the imported network is compared with torchvision's own model
holding the same weights.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from resnetlab import checkpoint as ckpt
from resnetlab.config import ConfigError, from_dict
from resnetlab.data import DataError, DataMeta
from resnetlab.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from resnetlab.inference import build_inference_model
from resnetlab.models import create_model, list_models, model_defaults
from resnetlab.outputs import check_output
from resnetlab.params import named

DEFAULT_DATA_ROOT = "data/imagenet"  # where `eval` looks for train/ and val/ unless data.root=...
IMAGE_SIZE, RESIZE = 224, 256  # torchvision's ImageNet evaluation: resize 256, centre crop 224
PARITY_TOLERANCE = 1e-4


@dataclass
class ImportResult:
    """The written checkpoint and how closely it reproduces torchvision."""

    path: Path
    arch: str
    num_classes: int
    max_abs_diff: float | None  # vs torchvision's model, None when torchvision has no such arch


def read_class_names(path: str | Path) -> list[str]:
    """One class name per line; blank lines and surrounding spaces ignored; names unique."""
    p = Path(path).expanduser()
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p}: cannot read the class names file ({e})") from None
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise DataError(f"{p}: no class names (expected one name per line)")
    seen: set[str] = set()
    for n, name in enumerate(names, 1):
        if name in seen:
            raise DataError(f"{p}: class name {name!r} appears twice (second time at name {n})")
        seen.add(name)
    return names


def _unwrap_state(obj: Mapping[str, object], source: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state dict file; also accepts {"state_dict": ...} / {"model": ...} and
    a DDP ``module.`` prefix, the usual ways such files are wrapped."""
    for key in ("state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and not ckpt.is_resnetlab(obj):
            obj = inner
            break
    if ckpt.is_resnetlab(obj):
        raise ckpt.CheckpointError(f"{source}: already a resnetlab checkpoint; use it directly")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ckpt.CheckpointError(f"{source}: holds no tensors; expected a torchvision state dict "
                                   "saved with torch.save(model.state_dict(), path)")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _weights_file(path: Path) -> Path:
    """The weights file itself; a timm / Hugging Face folder gives its model.safetensors (else
    pytorch_model.bin)."""
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return path / name
        raise ckpt.CheckpointError(f"{path}: a folder without model.safetensors or pytorch_model.bin")
    return path


def source_class_names(file: Path, arch: str, num_classes: int) -> list[str]:
    """The class names the weights' source carries, else ``"0".."k-1"``.

    Looked for in order: ``label_names`` in a ``config.json`` beside the file (timm's
    ``save_for_hf`` layout, ``resnetlab publish``), ``id2label`` there (transformers), then for
    1000 classes the ImageNet categories torchvision ships with its weights' metadata for ``arch``
    (read from the package, nothing downloaded). Lists of another length are ignored.
    """
    import json

    config = file.parent / "config.json"
    if config.is_file():
        try:
            doc = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            doc = {}
        if isinstance(doc, dict):
            labels = doc.get("label_names") or doc.get("pretrained_cfg", {}).get("label_names")
            id2label = doc.get("id2label")
            if not labels and isinstance(id2label, dict):
                labels = [id2label.get(str(i)) for i in range(num_classes)]
            if isinstance(labels, list) and len(labels) == num_classes and all(isinstance(n, str) for n in labels):
                return list(labels)
    if num_classes == 1000:
        import torchvision

        try:
            enum = torchvision.models.get_model_weights(arch)
        except ValueError:  # torchvision has no such architecture (a resnetlab-only variant)
            enum = None
        for w in enum or ():
            categories = w.meta.get("categories")
            if categories is not None and len(categories) == num_classes:
                return list(categories)
    return [str(i) for i in range(num_classes)]


def _check_arch(arch: str) -> None:
    if arch not in list_models():
        close = difflib.get_close_matches(arch, list_models(), n=3)
        hint = f"; closest: {', '.join(close)}" if close else "; see `resnetlab models`"
        raise named(ConfigError, "arch", f"names an unknown model, {arch!r}{hint}")


def _misfit(arch: str, state: Mapping[str, torch.Tensor], num_classes: int, in_chans: int) -> str | None:
    """Why ``state`` does not load into ``arch`` (first few keys named), or None if it fits.

    The model is built on the ``meta`` device: shapes only, no memory, no init cost.
    """
    with torch.device("meta"):
        own = {k: tuple(v.shape) for k, v in
               create_model(arch, num_classes=num_classes, in_chans=in_chans).state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    problems = []
    shape = sorted(k for k in own.keys() & theirs.keys() if own[k] != theirs[k])
    if shape:
        problems.append(f"{len(shape)} shape mismatch(es), e.g. {shape[0]}: {list(theirs[shape[0]])} "
                        f"in the file vs {list(own[shape[0]])} in {arch}")
    for what, keys in (("missing", sorted(own.keys() - theirs.keys())),
                       ("unexpected", sorted(theirs.keys() - own.keys()))):
        if keys:
            problems.append(f"{len(keys)} {what} key(s), e.g. {', '.join(keys[:3])}")
    return "; ".join(problems) or None


def _same_depths(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered models with as many blocks per stage as ``state`` (``layer<i>.<j>.`` keys):
    the only ones worth building to see whether the weights fit."""
    depth: dict[int, int] = {}
    for key in state:
        m = re.match(r"layer(\d+)\.(\d+)\.", key)
        if m:
            depth[int(m[1])] = max(depth.get(int(m[1]), 0), int(m[2]) + 1)
    layers = tuple(depth[i] for i in sorted(depth))
    return [name for name in list_models() if tuple(model_defaults(name).get("layers", ())) == layers]


@torch.no_grad()
def _torchvision_parity(arch: str, state: Mapping[str, torch.Tensor], ours: torch.nn.Module,
                        num_classes: int, in_chans: int) -> float | None:
    """Largest |ours - torchvision| on a random batch, or None if torchvision cannot compare."""
    import torchvision

    if in_chans != 3 or arch not in torchvision.models.list_models():
        return None
    theirs = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    try:
        theirs.load_state_dict(state, strict=True)
    except RuntimeError:
        return None  # torchvision's layout differs for this arch (e.g. a resnetlab-only variant)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # [b, c, h, w]
    return (ours(x) - theirs.eval()(x)).abs().max().item()


def import_torchvision(file: str | Path, arch: str, classes: str | Path | None = None,
                       output: str | Path | None = None, *,
                       data_root: str = DEFAULT_DATA_ROOT, force: bool = False) -> ImportResult:
    """Turn the torchvision state dict at ``file`` into a resnetlab checkpoint for ``arch``.

    ``classes``: a text file with one class name per line (as many as the classifier has
    outputs); default ``"0".."k-1"``. ``output``: the checkpoint to write, default
    ``<file stem>.resnetlab.pt`` beside ``file``. ``data_root`` is stored as ``data.root`` for
    ``eval`` (override it there). The class count and input channels are read off the weights.
    An existing ``output`` is refused unless ``force``; a run's checkpoint or ``file`` always.
    """
    src = _weights_file(Path(file).expanduser())
    out = Path(output).expanduser() if output is not None else src.with_name(f"{src.stem}.resnetlab.pt")
    check_output(out, force=force, sources=[src], what="imported checkpoint")
    _check_arch(arch)
    loaded = ckpt.load_safetensors(src) if src.suffix == ".safetensors" else ckpt.load_checkpoint(src)
    state = _unwrap_state(loaded, src)
    fc, conv1 = state.get("fc.weight"), state.get("conv1.weight")
    if fc is None or fc.ndim != 2 or conv1 is None or conv1.ndim != 4:
        raise ckpt.CheckpointError(f"{src}: no fc.weight [classes, features] and conv1.weight "
                                   "[out, in, kh, kw]; is this a torchvision ResNet state dict?")
    num_classes, in_chans = int(fc.shape[0]), int(conv1.shape[1])
    names = read_class_names(classes) if classes is not None else source_class_names(src, arch, num_classes)
    if len(names) != num_classes:
        raise DataError(f"{classes}: {len(names)} class names, but the weights in {src} have "
                        f"{num_classes} outputs (fc.weight is {list(fc.shape)})")

    cfg = from_dict({"model": {"name": arch, "num_classes": num_classes, "in_chans": in_chans},
                     "data": {"name": "folder", "root": data_root, "image_size": IMAGE_SIZE,
                              "resize": RESIZE},
                     "run": {"name": f"imported-{arch}"}})
    # ImageNet statistics for RGB; other channel counts have no standard, 0.5/0.5 maps 0..1 to -1..1.
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,) * in_chans, (0.5,) * in_chans)
    meta = DataMeta(name="folder", classes=tuple(names), in_chans=in_chans,
                    input_size=(IMAGE_SIZE, IMAGE_SIZE), mean=mean, std=std, resize=RESIZE)
    why = _misfit(arch, state, num_classes, in_chans)
    if why is not None:
        fits = [name for name in _same_depths(state) if _misfit(name, state, num_classes, in_chans) is None]
        hint = f"they fit: {', '.join(fits)}" if fits else "no registered model fits them"
        raise named(ckpt.CheckpointError, "arch", f"{arch} does not fit the weights in {src} ({why}); {hint}")
    model = build_inference_model(state, cfg, meta, source=str(src))
    diff = _torchvision_parity(arch, state, model, num_classes, in_chans)
    if diff is not None and not diff <= PARITY_TOLERANCE:
        raise ckpt.CheckpointError(f"{src}: imported {arch} differs from torchvision's by {diff:.3g} "
                                   f"(> {PARITY_TOLERANCE:g}); not written")

    ckpt.write_weights(out, model.state_dict(), cfg, meta.to_dict(),
                       source={"kind": "torchvision", "file": str(src), "arch": arch})
    return ImportResult(out, arch, num_classes, diff)


__all__ = ["ImportResult", "import_torchvision", "read_class_names"]
