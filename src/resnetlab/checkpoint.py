"""The checkpoint format: one owner for what a checkpoint holds and for every read and write.

A leaf module: it imports nothing of resnetlab but the config, the model contract
(``models.base``) and the version string, so the predictor and the server read checkpoints
without loading any training code.

Schema of a checkpoint (``checkpoints/last.pt``, ``best.pt``, files from ``resnetlab import``),
the fields of :class:`Checkpoint`::

    model      state dict of the plain module (no ``module.``/``_orig_mod.`` prefixes)
    config     the resolved config (``config.to_dict``)
    meta       the data meta (classes, channels, preprocessing) as a plain dict
    optimizer  optimizer.state_dict()                                  | None in a weights-
    ema        EMA weights (state dict) or None                        | only file (``resnetlab
    scaler     GradScaler state or None (fp16 AMP)                     | import``): eval, export
    meter      the epoch's running sums                                | and init_from accept it,
    rng        {"world_size": W, "ranks": [per-rank random states]}    | a resume refuses it
    state      the counters: epoch, batch, step, best_val_err, best_epoch
    source     where imported weights came from, or absent
    version    resnetlab version that wrote it
    schema     :data:`SCHEMA_VERSION` (absent in files written before it existed: read as 1)

An exported ``.safetensors`` carries ``config`` and ``meta`` as JSON in its header, under
:data:`SAFETENSORS_CONFIG_KEY` and :data:`SAFETENSORS_META_KEY`. Saves are atomic (temp file,
fsync, ``os.replace``: a kill leaves the previous file intact); loads use ``weights_only=True``
(a file needing other pickled objects is refused and its code never runs). The ``rng`` entry
is made and restored by :mod:`resnetlab.engine.rng` (training only).
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from resnetlab.config import Config, ConfigError, from_dict, to_dict
from resnetlab.filekind import not_a_checkpoint, unpickling_detail
from resnetlab.models.base import classifier_name
from resnetlab.version import __version__

SCHEMA_VERSION = 1  # bump when a field changes meaning; readers refuse newer files by name
CHECKPOINT_DIR = "checkpoints"
_UMASK = os.umask(0)  # read once: mkstemp makes 0600 files, saved files get the usual mode
os.umask(_UMASK)
LAST = "last.pt"
BEST = "best.pt"
# The entries a checkpoint needs before a run can continue from it.
TRAINING_KEYS = ("model", "optimizer", "meter", "rng", "state")
# Keys of an exported safetensors header (string -> string) that carry what a .pt file holds.
SAFETENSORS_CONFIG_KEY = "resnetlab.config"
SAFETENSORS_META_KEY = "resnetlab.meta"
SAFETENSORS_ARCH_KEY = "arch"
SAFETENSORS_VERSION_KEY = "resnetlab_version"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model; the message names the file/keys."""


# -- atomic writes -------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write_fn: Callable[[IO[bytes]], object]) -> None:
    """Call ``write_fn(file_object)`` on a temp file beside ``path``, fsync, then rename over it.

    If ``write_fn`` raises (disk full, a bug, an interrupt) the temp file is removed and the
    previous ``path`` is untouched, byte for byte.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class _WriteWatch:
    """A file object that remembers the OS error of a failed write: torch's zip writer turns it
    into ``RuntimeError: ... unexpected pos``, which no longer says what happened."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """Atomically ``torch.save`` a checkpoint dict (tensors, numbers, strings, lists, dicts).

    A write the OS refuses (disk full, file-size limit, quota) raises that OSError, naming
    ``path``, instead of the RuntimeError torch's zip writer makes of it; ``path`` is untouched.
    """
    watch: list[_WriteWatch] = []

    def write(f: IO[bytes]) -> None:
        watch.append(_WriteWatch(f))
        torch.save(dict(state), watch[-1])  # type: ignore[arg-type]  # torch calls write/flush only

    try:
        atomic_write(path, write)
    except RuntimeError:
        err = watch[-1].error if watch else None
        if err is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; refuse, with the file named, anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if kind := not_a_checkpoint(path):  # an .onnx model or a damaged file is not "pickled objects"
        raise CheckpointError(f"{path}: {kind}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = unpickling_detail(str(e))
        raise CheckpointError(
            f"{path}: refused to load: it holds pickled objects other than tensors and plain "
            f"data, which could run code (weights_only=True). Detail: {first}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    return obj


def latest(run_dir: str | Path) -> Path | None:
    """``runs/<name>/checkpoints/last.pt`` if it exists."""
    p = Path(run_dir) / CHECKPOINT_DIR / LAST
    return p if p.is_file() else None


def resolve(path: str | Path, prefer: str = BEST) -> Path:
    """A checkpoint file from a run folder (``best.pt``, else ``last.pt``) or a file path."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in (prefer, BEST, LAST):
            cand = p / CHECKPOINT_DIR / name
            if cand.is_file():
                return cand
        raise CheckpointError(f"{p}: run folder has no {CHECKPOINT_DIR}/{BEST} or {CHECKPOINT_DIR}/{LAST}")
    if not p.exists():
        raise CheckpointError(f"{p}: no such run folder or checkpoint file")
    return p


# -- weights -------------------------------------------------------------------------------------


def model_state(ckpt: Mapping[str, Any], source: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The weights to use for inference: the EMA copy when training kept one; checked to be a
    mapping of names to tensors (errors name ``source``)."""
    state = ckpt.get("ema") or ckpt.get("model")
    return check_state_dict(state, source, entry="ema" if ckpt.get("ema") else "model")


def check_state_dict(state: Any, source: str | Path, entry: str = "model") -> dict[str, torch.Tensor]:
    """``state`` as a dict if it maps strings to tensors; else a CheckpointError naming the file."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: its {entry!r} entry should map parameter names to tensors, "
                              f"found {type(state).__name__}")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: its {entry!r} entry holds non-tensor values or non-string "
                              f"names: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    return dict(state)


def non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors (weights and buffers such as BN statistics) holding
    NaN or infinity. One host read for all of them."""
    names = [k for k, v in tensors.items() if v.is_floating_point() and v.numel()]
    if not names:
        return []
    ok = torch.stack([tensors[k].detach().isfinite().all() for k in names]).tolist()
    return [k for k, good in zip(names, ok, strict=True) if not good]


def check_finite(tensors: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Refuse weights with NaN/inf (a diverged run): CheckpointError naming the file and keys."""
    bad = non_finite(tensors)
    if bad:
        raise CheckpointError(f"{source}: holds non-finite values (NaN or inf) in {len(bad)} tensor(s): "
                              f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; the run diverged "
                              f"before this was saved; use an earlier checkpoint or retrain")


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "weights",
                 reinit_head: bool = False) -> None:
    """Load ``state`` into ``model`` strictly; name every missing, unexpected or mis-shaped key.

    ``reinit_head=True`` drops the classifier (the one the model declares: ``fc.*`` for a ResNet)
    from ``state`` when its shape does not fit, keeping the model's freshly initialised head
    (fine-tuning to another class count).
    """
    own = model.state_dict()
    state = check_state_dict(state, source)
    head = classifier_name(model) + "." if hasattr(model, "get_classifier") else None
    if reinit_head and head is not None:
        for k in [k for k in state if k.startswith(head)]:
            if k in own and own[k].shape != state[k].shape:
                del state[k]
                state[k] = own[k]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(f"{k}: {tuple(state[k].shape)} in {source} vs {tuple(own[k].shape)} in model"
                   for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        parts = []
        if shape:
            parts.append("shape mismatch: " + "; ".join(shape))
        if missing:
            parts.append("missing: " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected[:10]) + (" ..." if len(unexpected) > 10 else ""))
        hint = " (to fine-tune on another number of classes, re-initialise the head)" if head and any(
            k.startswith(head) for k in shape) else ""
        raise CheckpointError(f"{source} does not fit the model: " + " | ".join(parts) + hint)
    # A float tensor read as integers (or the reverse) has the right shape and wrong values:
    # a dtype edited in a file header, say. Precision changes (fp16 -> fp32) are fine.
    kinds = sorted(f"{k}: {state[k].dtype} in {source} vs {own[k].dtype} in model" for k in own
                   if state[k].is_floating_point() != own[k].is_floating_point()
                   or state[k].is_complex() != own[k].is_complex())
    if kinds:
        raise CheckpointError(f"{source}: wrong tensor dtype: " + "; ".join(kinds[:5])
                              + (" ..." if len(kinds) > 5 else ""))
    check_finite(state, source)
    model.load_state_dict(state, strict=True)


def save_safetensors(model_or_state: nn.Module | Mapping[str, torch.Tensor], path: str | Path,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Atomically write weights as safetensors (contiguous CPU copies; shared storage split)."""
    blob = safetensors_bytes(model_or_state, metadata)
    atomic_write(path, lambda f: f.write(blob))


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file (no code can run on load); errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


# -- the format: one dataclass, read and written only here ---------------------------------------


@dataclass
class Checkpoint:
    """Everything a checkpoint file holds (see the module doc for each field).

    ``config`` and ``meta`` stay plain dicts, as saved: :meth:`parsed_config` checks the config
    against this version of resnetlab, and the data meta is parsed by whoever needs it.
    """

    model: dict[str, Any]
    config: dict[str, Any]
    meta: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    ema: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    meter: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    state: dict[str, Any] | None = None
    source: dict[str, Any] | None = None
    version: str = __version__
    schema: int = SCHEMA_VERSION
    path: Path | None = field(default=None, compare=False)  # the file it was read from; not saved

    def to_dict(self) -> dict[str, Any]:
        """The dict ``torch.save`` writes (``source`` only when set, as files always had)."""
        out: dict[str, Any] = {
            "model": self.model, "optimizer": self.optimizer, "ema": self.ema, "scaler": self.scaler,
            "meter": self.meter, "rng": self.rng, "state": self.state, "config": self.config,
            "meta": self.meta, "version": self.version, "schema": self.schema,
        }
        if self.source is not None:
            out["source"] = self.source
        return out

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], path: str | Path) -> Checkpoint:
        """A loaded dict as a Checkpoint; CheckpointError naming ``path`` when it is not one."""
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(
                f"{path}: a bare state dict without resnetlab's config and data meta; turn torchvision "
                f"weights into a checkpoint with `resnetlab import torchvision {path}` and the model's "
                "architecture (in Python resnetlab.importers.import_torchvision)")
        missing = [k for k in ("model", "config", "meta") if obj.get(k) is None]
        if missing:
            raise CheckpointError(
                f"{path}: not a resnetlab checkpoint (missing {', '.join(missing)}); expected a run "
                f"folder, checkpoints/best.pt or last.pt, or a file from `resnetlab import`")
        if not isinstance(obj["config"], Mapping) or not isinstance(obj["meta"], Mapping):
            raise CheckpointError(f"{path}: 'config' and 'meta' must be mappings")
        schema = obj.get("schema", 1)
        if not isinstance(schema, int) or schema > SCHEMA_VERSION:
            raise CheckpointError(
                f"{path}: checkpoint schema {schema!r} (written by resnetlab {obj.get('version', '?')}) "
                f"is newer than this resnetlab reads ({SCHEMA_VERSION}); upgrade resnetlab")

        def opt(key: str) -> Any:  # mappings as plain dicts; None or a malformed value as it is
            return dict(obj[key]) if isinstance(obj.get(key), Mapping) else obj.get(key)
        return cls(model=opt("model"), config=dict(obj["config"]), meta=dict(obj["meta"]),
                   optimizer=opt("optimizer"), ema=opt("ema"), scaler=opt("scaler"), meter=opt("meter"),
                   rng=opt("rng"), state=opt("state"), source=opt("source"),
                   version=str(obj.get("version", "?")), schema=schema, path=Path(path))

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The weights for inference: the EMA copy when training kept one, checked to be tensors."""
        return model_state(self.to_dict(), self.path or "checkpoint")

    def parsed_config(self) -> Config:
        """The stored config as a :class:`~resnetlab.config.Config`, checked by this version."""
        try:
            return from_dict(self.config)
        except ConfigError as e:
            raise CheckpointError(f"{self.path}: its stored config is not valid here: {e}") from None


def write(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Atomically write ``checkpoint`` to ``path`` (a ``.pt`` file)."""
    save_checkpoint(checkpoint.to_dict(), path)
    return Path(path)


def write_weights(path: str | Path, weights: Mapping[str, torch.Tensor], config: Config,
                  meta: Mapping[str, Any], *, source: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint of weights, config and meta without training state (what ``resnetlab
    import`` writes): eval, predict, export and ``model.init_from`` accept it; a resume refuses
    it (no optimizer). Non-finite weights are refused, naming ``path``, before anything is written."""
    weights = dict(weights)
    check_finite(weights, path)
    return write(path, Checkpoint(model=weights, config=to_dict(config), meta=dict(meta),
                                  source=dict(source) if source is not None else None))


def read(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """The checkpoint at ``path``: a run folder (``best.pt``, else ``last.pt``), a ``.pt`` file,
    or a ``.safetensors`` file from ``resnetlab export`` (its header carries config and meta).

    Errors (:class:`CheckpointError`) name the file and say what to do, e.g. run
    ``resnetlab import`` for a bare state dict.
    """
    file = resolve(path)
    if file.suffix == ".safetensors":
        header = read_safetensors_header(file)
        if SAFETENSORS_CONFIG_KEY not in header or SAFETENSORS_META_KEY not in header:
            raise CheckpointError(
                f"{file}: safetensors header has no {SAFETENSORS_CONFIG_KEY!r}/{SAFETENSORS_META_KEY!r}; "
                "only safetensors files resnetlab wrote (`resnetlab export` to safetensors, `resnetlab publish`) "
                "can be loaded by name")
        try:
            config = json.loads(header[SAFETENSORS_CONFIG_KEY])
            meta = json.loads(header[SAFETENSORS_META_KEY])
        except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: absurdly deep nesting
            raise CheckpointError(f"{file}: corrupt resnetlab header ({type(e).__name__}: "
                                  f"{str(e)[:200]})") from None
        obj = {"model": load_safetensors(file), "config": config, "meta": meta,
               "version": header.get(SAFETENSORS_VERSION_KEY, "?")}
        return Checkpoint.from_dict(obj, file)
    return Checkpoint.from_dict(load_checkpoint(file, map_location=map_location), file)


def read_training(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """The training checkpoint at ``path`` (a file), every entry a resume needs present."""
    obj = load_checkpoint(path, map_location=map_location)
    missing = [k for k in TRAINING_KEYS if obj.get(k) is None]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint (missing {', '.join(missing)}); "
                              f"cannot resume from it")
    for key in ("state", "rng"):
        if not isinstance(obj[key], Mapping):
            raise CheckpointError(f"{path}: its {key!r} entry should be a mapping")
    return Checkpoint.from_dict(obj, path)


def is_resnetlab(obj: Mapping[str, Any]) -> bool:
    """Whether a loaded dict is a resnetlab checkpoint (has config and meta), not foreign weights."""
    return isinstance(obj.get("config"), Mapping) and isinstance(obj.get("meta"), Mapping)


# -- safetensors ---------------------------------------------------------------------------------


def safetensors_header(config: Config, meta: Mapping[str, Any]) -> dict[str, str]:
    """The header an exported ``.safetensors`` carries, so :func:`read` rebuilds the network."""
    return {SAFETENSORS_CONFIG_KEY: json.dumps(to_dict(config)), SAFETENSORS_META_KEY: json.dumps(dict(meta)),
            SAFETENSORS_ARCH_KEY: config.model.name, SAFETENSORS_VERSION_KEY: __version__}


def safetensors_bytes(model_or_state: nn.Module | Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> bytes:
    """Weights as safetensors bytes (contiguous CPU copies; shared storage split)."""
    from safetensors.torch import save

    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    return save(tensors, metadata=dict(metadata or {}))


def read_safetensors_header(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file's header ({} when it has none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


__all__ = [
    "BEST", "CHECKPOINT_DIR", "LAST", "SAFETENSORS_ARCH_KEY", "SAFETENSORS_CONFIG_KEY", "SAFETENSORS_META_KEY",
    "SAFETENSORS_VERSION_KEY", "SCHEMA_VERSION", "TRAINING_KEYS", "Checkpoint", "CheckpointError", "atomic_write",
    "check_finite", "check_state_dict", "is_resnetlab", "latest", "load_checkpoint", "load_safetensors",
    "load_weights", "model_state", "non_finite", "read", "read_safetensors_header", "read_training",
    "resolve", "safetensors_bytes", "safetensors_header", "save_checkpoint", "save_safetensors",
    "write", "write_weights",
]
