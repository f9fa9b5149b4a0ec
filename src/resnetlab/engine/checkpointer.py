"""``Checkpointer``: the one owner of a run folder's checkpoints.

It holds the run folder's lock for the run's lifetime, decides whether a run starts fresh or
resumes, writes ``config.yaml`` once the run has really started,
saves the checkpoints from rank 0 with every rank's random state, restores them, and remembers
the last good one. What a checkpoint holds (its schema) and how it is read and written belong to
:mod:`resnetlab.checkpoint`; this class decides when, and with which training state.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from resnetlab import checkpoint as ckpt
from resnetlab.config import Config, ConfigError, flatten, from_dict, resume_changes, to_dict
from resnetlab.data.augment import derive_seed
from resnetlab.engine import rng
from resnetlab.engine.dist import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    barrier,
    broadcast_object,
)
from resnetlab.engine.errors import (
    NonFiniteLossError,
    RunFolderBusyError,
    RunFolderGoneError,
    TrainingError,
)
from resnetlab.engine.metrics import SumMeter, append_jsonl
from resnetlab.engine.optim import ModelEMA
from resnetlab.engine.state import TrainState
from resnetlab.runtime import default_run_name, non_finite_forward

log = logging.getLogger("resnetlab")

LOCK_FILE = ".lock"  # in the run folder; holds "pid host" of the process that trains in it
# Files that only a training run writes: their presence means the folder holds a run.
HISTORY = "history.jsonl"  # one line per resume that changed a key: {"time", "changed": {key: [old, new]}}
RUN_FILES = ("config.yaml", HISTORY, "metrics.jsonl", "summary.csv", "result.json",
             f"{ckpt.CHECKPOINT_DIR}/{ckpt.LAST}", f"{ckpt.CHECKPOINT_DIR}/{ckpt.BEST}", "tb")


@dataclass
class TrainParts:
    """What a training checkpoint saves besides the counters: model, optimiser, EMA, scaler,
    and the epoch's running sums. ``model`` is the plain module (not the DDP/compile wrapper)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: ModelEMA | None
    scaler: torch.amp.GradScaler | None
    meter: SumMeter


class Checkpointer:
    """A locked run folder and its checkpoints; every rank holds one (rank 0 does the writing).

    Use :meth:`open` (a collective: every rank calls it) and :meth:`close` (or ``with``).
    """

    def __init__(self, run_dir: Path, dist: DistInfo, device: torch.device, *, resume: bool) -> None:
        self.run_dir, self.dist, self.device, self.resume = run_dir, dist, device, resume
        self.last_good: Path | None = ckpt.latest(run_dir)
        self._lock: int | None = None
        self.probe: torch.Tensor | None = None  # [b, c, h, w] normalised validation images, see set_probe

    def set_probe(self, loader: Any, max_images: int = 32) -> None:
        """Keep the first ``max_images`` of ``loader``'s first batch (a validation loader: no
        augmentation, no random draws) to check every save's forward pass on."""
        if loader is None:
            return
        for x, _ in loader.iterate(0):
            self.probe = x[:max_images]
            break

    def _forward_problem(self, parts: TrainParts) -> str | None:
        if self.probe is None:
            return None
        problem = non_finite_forward(parts.model, self.probe)
        if problem is None and parts.ema is not None:
            ema = non_finite_forward(parts.ema.module, self.probe)
            problem = f"EMA weights: {ema}" if ema else None
        return problem

    # -- the run folder --------------------------------------------------------------------------

    @classmethod
    def open(cls, cfg: Config, dist: DistInfo, device: torch.device) -> Checkpointer:
        """Name the run folder (agreed across ranks), lock it, check it, clear stale temp files.

        A fresh run (``train.resume=never``) refuses a folder holding any earlier run's files;
        a second process on a locked folder fails at once, naming the holder.
        """
        name = broadcast_object(cfg.run.name or default_run_name(cfg))
        run_dir = Path(cfg.run.root).expanduser() / name
        self = cls(run_dir, dist, device, resume=cfg.train.resume == "auto")
        error = None
        if dist.is_main:
            try:
                self._claim()
            except TrainingError as e:
                error = str(e)
        error = broadcast_object(error)
        if error is not None:
            self.close()
            raise (RunFolderBusyError if "in use by" in error else TrainingError)(error)
        self.last_good = ckpt.latest(run_dir)
        return self

    def _claim(self) -> None:
        (self.run_dir / ckpt.CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.run_dir / LOCK_FILE)
        if not self.resume:
            found = [f for f in RUN_FILES if (self.run_dir / f).exists()]
            if found:
                raise TrainingError(
                    f"{self.run_dir} already holds a training run ({', '.join(found)}); resume it with "
                    "train.resume=auto or pick another run.name")
        stale = [p for d in (self.run_dir, self.run_dir / ckpt.CHECKPOINT_DIR) for p in d.glob(".*.tmp")]
        for p in stale:  # left by a save that was killed; we hold the lock, so nobody writes them now
            p.unlink(missing_ok=True)
        if stale:
            log.info("removed %d stale temporary file(s) of an interrupted save in %s", len(stale), self.run_dir)

    def close(self) -> None:
        """Release the run folder's lock (the OS also releases it if the process dies)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def resume_path(self) -> Path | None:
        """The checkpoint to continue from (``last.pt`` with ``train.resume=auto``), else None."""
        return ckpt.latest(self.run_dir) if self.resume else None

    def write_config(self, cfg: Config) -> None:
        """Write ``config.yaml`` (the resolved config, with the run name). Called once the run has
        really started, so a resume that fails to load leaves the old config as it was."""
        if self.dist.is_main:
            resolved = replace(cfg, run=replace(cfg.run, name=self.run_dir.name))
            self._record_history(resolved)
            text = yaml.safe_dump(to_dict(resolved), sort_keys=False)
            ckpt.atomic_write(self.run_dir / "config.yaml", lambda f: f.write(text.encode()))
        barrier()

    def _record_history(self, cfg: Config) -> None:
        """Append the keys a resume changed (``{key: [before, after]}``) to ``history.jsonl``."""
        path = self.run_dir / "config.yaml"
        if not path.is_file():
            return
        try:
            before = dict(flatten(yaml.safe_load(path.read_text()) or {}))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return  # unreadable: resume_config refused it already, unless train.resume=auto
        after = dict(flatten(to_dict(cfg)))
        # run.root may differ with the same folder; train.resume is how this process started
        # (auto on every resume), which the line's "resumed" already says
        changed = {k: [before.get(k), v] for k, v in after.items()
                   if before.get(k) != v and k not in ("run.root", "train.resume")}
        if changed:
            append_jsonl(self.run_dir / HISTORY, {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                  "resumed": True, "changed": changed})

    def finished_result(self) -> dict[str, Any] | None:
        """``result.json`` of a finished run, or None."""
        path = self.run_dir / "result.json"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    # -- saving ----------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.run_dir / ckpt.CHECKPOINT_DIR / name

    def save(self, name: str, parts: TrainParts, state: TrainState, cfg: Config,
             meta: Mapping[str, Any]) -> Path:
        """Save ``checkpoints/<name>`` (a collective: every rank calls it; rank 0 writes).

        Refuses, on every rank alike, weights or buffers (BN statistics) that are not finite:
        the previous file stays as it was.
        """
        weights = parts.model.state_dict()
        bad = ckpt.non_finite(weights) + [f"ema.{k}" for k in
                                          (ckpt.non_finite(parts.ema.state_dict()) if parts.ema else [])]
        forward = None if bad else self._forward_problem(parts)
        # rank 0 writes: it alone looks for the run folder, and every rank learns the answer here
        # (one rank raising alone would leave the others waiting in the next collective)
        meter_sums = all_reduce_sum(parts.meter.sums.clone())  # every rank's samples, in any process count
        gone = self.dist.is_main and not self.run_dir.is_dir()  # saving would re-create a stub
        gathered = all_gather_object((rng.rng_state(self.device), bad, forward, gone))
        if any(g for _, _, _, g in gathered):
            raise RunFolderGoneError(self.run_dir)
        bad_anywhere = sorted({k for _, b, _, _ in gathered for k in b})
        forward = next((f for _, _, f, _ in gathered if f), None)
        if forward is not None and not bad_anywhere:
            raise NonFiniteLossError(
                f"the weights at epoch {state.epoch + 1}, step {state.step} are not usable: {forward} of "
                f"the validation split (finite weights, diverged); not saving over {self.path(name)}. "
                f"Last good checkpoint: {self.last_good or 'none saved yet'}. Try a lower optim.lr or set "
                f"optim.clip_grad_norm.")
        if bad_anywhere:
            raise NonFiniteLossError(
                f"weights or statistics are not finite at epoch {state.epoch + 1}, step {state.step} "
                f"({', '.join(bad_anywhere[:3])}{' ...' if len(bad_anywhere) > 3 else ''}); not saving "
                f"over {self.path(name)}. Last good checkpoint: {self.last_good or 'none saved yet'}. "
                f"Try a lower optim.lr or set optim.clip_grad_norm.")
        target = self.path(name)
        if self.dist.is_main:
            _save_reporting_os_errors(ckpt.Checkpoint(
                model=weights,
                optimizer=parts.optimizer.state_dict(),
                ema=parts.ema.state_dict() if parts.ema is not None else None,
                scaler=parts.scaler.state_dict() if parts.scaler is not None else None,
                # summed over the ranks: restored on rank 0 and zeros elsewhere (restore), so the
                # epoch's all-reduce counts each sample once with any number of processes
                meter={"sums": meter_sums.cpu()},
                rng=rng.pack_rng([r for r, *_ in gathered]),
                state=state.state_dict(),
                config=to_dict(cfg),
                meta=dict(meta),
            ), target)
        if name == ckpt.LAST:
            self.last_good = target
        return target

    # -- restoring -------------------------------------------------------------------------------

    def restore(self, path: Path, parts: TrainParts, state: TrainState, cfg: Config) -> None:
        """Put every piece of ``path`` back so the run continues as if it had never stopped.

        Refuses (naming the file) a checkpoint that is malformed or holds non-finite weights,
        ``cfg`` changing a key that defines the run (:func:`resnetlab.config.resume_changes`:
        seed, data split, model, batch size...), and ``train.epochs`` below the epochs begun.
        """
        loaded = ckpt.read_training(path, map_location=self.device)
        assert loaded.state is not None and loaded.rng is not None  # read_training checked them
        saved = TrainState()
        saved.load_state_dict(loaded.state)
        self._check_resume_config(loaded.config, cfg)
        started = saved.epoch + (1 if saved.batch > 0 else 0)  # epochs done, plus one begun mid-way
        if cfg.train.epochs < started:
            raise ConfigError(
                f"train.epochs={cfg.train.epochs} is fewer than the {started} epoch(s) {path} has already "
                f"{'begun' if saved.batch > 0 else 'done'}; resume with train.epochs={started} or more")
        ckpt.load_weights(parts.model, loaded.model, source=str(path))
        try:
            parts.optimizer.load_state_dict(loaded.optimizer)  # type: ignore[arg-type]  # checked
            if parts.ema is not None and loaded.ema is not None:
                ckpt.check_finite(ckpt.check_state_dict(loaded.ema, path, "ema"), path)
                parts.ema.load_state_dict(loaded.ema)
            if parts.scaler is not None and loaded.scaler is not None:
                parts.scaler.load_state_dict(loaded.scaler)
            parts.meter.load_state_dict(loaded.meter)  # type: ignore[arg-type]  # checked
            if not self.dist.is_main:  # the saved sums are every rank's: counted once, on rank 0
                parts.meter.sums.zero_()
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise ckpt.CheckpointError(f"{path}: cannot restore the training state "
                                       f"({type(e).__name__}: {str(e)[:200]})") from None
        state.load_state_dict(loaded.state)
        self._restore_rng(loaded.rng, cfg.seed, state.step)

    def _check_resume_config(self, stored: Any, cfg: Config) -> None:
        """Refuse to continue a checkpoint under a config whose run-defining keys differ from
        ``stored``, the config it was trained with (``train.resume=auto`` reaches here without
        :func:`~resnetlab.engine.fit.resume_config`)."""
        if not isinstance(stored, Mapping):
            return  # a checkpoint without its config: the weights check still guards the model
        try:
            saved = from_dict({k: v for k, v in stored.items() if k != "run"}, check=False)
        except ConfigError:  # written by another resnetlab version: its keys are not ours to judge
            return
        # run.*: the folder may have been moved or copied. model.init_*: the weights and their
        # preprocessing come from this checkpoint (resolve_init_from never ran for this resume).
        ours = replace(cfg, run=saved.run, model=replace(
            cfg.model, init_from=saved.model.init_from, init_sha256=saved.model.init_sha256,
            init_preprocess=saved.model.init_preprocess))
        resume_changes(saved, ours, str(self.run_dir))

    def _restore_rng(self, saved: Mapping[str, Any], seed: int, step: int) -> None:
        own, note = rng.unpack_rng(saved, self.dist.rank, self.dist.world_size)
        if own is None:  # a rank the saving run did not have
            torch.manual_seed(derive_seed(seed, "rank", self.dist.rank, step))
        else:
            rng.set_rng_state(own, self.device)
        if note and self.dist.is_main:
            log.warning("%s", note)


def save_weights_checkpoint(path: str | Path, model: nn.Module, cfg: Config, meta: Mapping[str, Any],
                            source: Mapping[str, Any] | None = None) -> Path:
    """A checkpoint of weights, config and meta without training state (what ``resnetlab import``
    writes): eval, predict and export accept it; resuming from it is refused (no optimizer)."""
    return ckpt.write_weights(path, model.state_dict(), cfg, meta, source=source)


_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # disk full, file-size limit, quota


def _save_reporting_os_errors(checkpoint: ckpt.Checkpoint, target: Path) -> None:
    """``ckpt.write``; a full disk (or file-size limit, or quota) is one TrainingError naming the
    file, the previous file left as it was (the write is atomic)."""
    try:
        ckpt.write(target, checkpoint)
    except OSError as err:
        if err.errno not in _NO_SPACE:
            raise
        raise TrainingError(
            f"{target}: cannot save the checkpoint: no space left to write it ({err.strerror}); "
            f"the previous {target.name} is intact. Free space (or raise the file-size limit or quota) "
            f"and resume the run in {target.parent.parent} (train.resume=auto)") from None


def _lock(path: Path) -> int:
    """An exclusive lock on ``path`` (created if absent) that the OS drops when we die.

    Raises RunFolderBusyError naming the process that holds it.
    """
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
        finally:
            os.close(fd)
        raise RunFolderBusyError(
            f"{path.parent} is in use by another training process ({holder}); wait for it to finish, "
            f"stop it, or pick another run.name") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


__all__ = ["LOCK_FILE", "Checkpointer", "TrainParts", "save_weights_checkpoint"]
