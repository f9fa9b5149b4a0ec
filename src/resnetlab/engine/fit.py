"""``fit(config)``: the one place that wires data, model, optimiser, loop and checkpoints.

It reads like pycls's ``train_model``: set up the runtime, lock the
run folder, build loaders, build model/optimiser/EMA, resume, then epochs of (train, validate,
log, checkpoint), then the test split once and ``result.json``. Each step is a named function
below; the checkpoint schema and the run folder belong to
:class:`~resnetlab.engine.checkpointer.Checkpointer`, the per-step checks to
:class:`~resnetlab.engine.guard.StepGuard`, what the run reports as it goes (progress bar,
``metrics.jsonl``, TensorBoard) to :class:`~resnetlab.engine.runlog.RunLog`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from resnetlab import checkpoint as ckpt
from resnetlab import weights  # model.init_from; imports no training code
from resnetlab.config import Config, ConfigError, validate
from resnetlab.data import DataMeta, build_datasets, build_loader
from resnetlab.data.sources.folder import check_images, images_checked_with
from resnetlab.engine.checkpointer import Checkpointer, TrainParts
from resnetlab.engine.dist import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    barrier,
    init_from_env,
    map_sharded,
    shutdown,
    unwrap,
    wrap_ddp,
)
from resnetlab.engine.errors import NonFiniteLossError, RunFolderBusyError, TrainingError
from resnetlab.engine.freeze import freeze_for_epoch
from resnetlab.engine.guard import CONTINUE, STOP, SYNCED, StepGuard
from resnetlab.engine.loop import evaluate, train_one_epoch
from resnetlab.engine.metrics import SumMeter
from resnetlab.engine.optim import ModelEMA, build_optimizer, build_param_groups, lr_at
from resnetlab.engine.runlog import Progress, RunLog, epoch_row
from resnetlab.engine.state import TrainState
from resnetlab.models import build_model
from resnetlab.runtime import (
    EXIT_CODES,
    apply_speed_flags,
    checkpoint_interval,
    default_run_name,
    exit_code,
    seed_everything,
    select_device,
    sync_interval,
)

log = logging.getLogger("resnetlab")

# Re-exported: older code imports these helpers from here; they live in runtime/models now.
__all__ = ["EXIT_CODES", "NonFiniteLossError", "Result", "RunFolderBusyError", "TrainingError",
           "build_model", "default_run_name", "fit", "resume_config", "seed_everything", "select_device"]


@dataclass
class Result:
    """What ``train()`` returns: where the run lives and its final numbers."""

    run_dir: Path
    epochs: int  # epochs completed
    steps: int  # optimiser steps completed
    val: dict[str, float] = field(default_factory=dict)  # last validation
    best: dict[str, Any] = field(default_factory=dict)  # best validation and its epoch
    test: dict[str, Any] | None = None  # test split, evaluated once with the chosen weights
    interrupted: str | None = None  # "SIGTERM" / "SIGINT" / "stop" when stopped early

    @property
    def exit_code(self) -> int:
        return exit_code(self.interrupted)


@dataclass
class Loaders:
    """The data of a run: its datasets (with meta) and one loader per split used."""

    data: Any  # resnetlab.data.Datasets: train/val/test splits, meta, skipped files
    train: Any
    val: Any | None
    test_every_epoch: Any | None  # test split evaluated after every epoch (figures), or None
    kwargs: dict[str, Any]  # device/seed/rank...: to build the final test loader the same way
    meta: DataMeta  # the data's meta, normalised as model.init_from's weights expect
    init_source: Any = None  # weights.read_init_from(cfg): the init weights, or None


@dataclass
class Run:
    """Everything one training run holds while it runs (what the named steps share)."""

    cfg: Config
    dist: DistInfo
    device: torch.device
    ckpts: Checkpointer
    loaders: Loaders
    parts: TrainParts
    net: nn.Module  # the module to step: DDP and/or torch.compile around parts.model
    criterion: nn.Module
    state: TrainState
    guard: StepGuard
    lr_fn: Callable[[int], float]
    steps_per_epoch: int
    checkpoint_every: int  # mid-epoch save interval in steps (a multiple of the sync interval), 0 = off
    log: RunLog  # metrics.jsonl, summary.csv, TensorBoard (rank 0)
    val: dict[str, float] = field(default_factory=dict)

    @property
    def eval_net(self) -> nn.Module:
        # Evaluate the plain module: ranks hold shards of unequal length, and a DDP forward could
        # wait on a collective that a rank with one batch fewer never joins.
        return self.parts.ema.module if self.parts.ema is not None else unwrap(self.net)

    @property
    def meta(self) -> DataMeta:
        return self.loaders.meta


# ----------------------------------------------------------------------------------------------
# the recipe


def fit(cfg: Config, *, on_step: Callable[[dict[str, Any]], bool | None] | None = None) -> Result:
    """Train ``cfg`` end to end and return a :class:`Result` (the module doc gives the data flow).

    ``on_step(info)`` is called after every optimiser step with ``epoch``, ``batch``, ``step``,
    ``lr``, ``loss`` (a tensor) and ``model``; returning True stops training as a signal
    would (checkpoint saved, ``Result.interrupted == "stop"``). Under DDP a stop, like a signal,
    takes effect at the next sync step (``train.sync_every``), on every rank at once.
    """
    device, dist = setup_runtime(cfg)
    try:
        return _fit(cfg, device, dist, on_step)
    finally:
        if dist.owns_group:  # a group fit() joined is left, however the run ends (no leaked NCCL communicators)
            shutdown()


def _fit(cfg: Config, device: torch.device, dist: DistInfo,
         on_step: Callable[[dict[str, Any]], bool | None] | None) -> Result:
    if not _resumes(cfg):  # a resume has them in its config.yaml, and the file may be gone by now
        cfg = weights.resolve_init_from(cfg)  # model.init_from as a file path + its SHA-256, for config.yaml
    with Checkpointer.open(cfg, dist, device) as ckpts:
        loaders = build_loaders(cfg, dist, device, resume_from=ckpts.resume_path())
        parts, criterion = build_training(cfg, loaders, device, init=ckpts.resume_path() is None)
        state = TrainState()
        resume(ckpts, parts, state, cfg)
        if state.epoch >= cfg.train.epochs and (done := ckpts.finished_result()) is not None:
            log.info("%s already finished %d epoch(s); nothing to do", ckpts.run_dir, state.epoch)
            return _result_of_finished_run(ckpts.run_dir, state, done)
        run = start_run(cfg, dist, device, ckpts, loaders, parts, criterion, state, on_step)
        with run.guard:
            while state.epoch < cfg.train.epochs:
                stopped = run_epoch(run)
                if stopped is not None:
                    return stopped
        return finish(run)


def setup_runtime(cfg: Config) -> tuple[torch.device, DistInfo]:
    """Device, process group (under torchrun), threads and speed switches."""
    device = select_device(cfg.train.device)
    dist = init_from_env(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if device.type == "cuda":
        # The current device of this process: without it, train.device=cuda:1 would still open a
        # context on GPU 0 (the pin-memory thread, cuDNN's handles, torch.cuda.* calls without one).
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    apply_speed_flags(cfg.train, device)
    return device, dist


def build_loaders(cfg: Config, dist: DistInfo, device: torch.device, resume_from: Path | None = None) -> Loaders:
    """Datasets, then a loader per split (each rank reads its shard of every batch). Resuming
    from ``resume_from``, the init weights are not read: the checkpoint holds the weights and
    the preprocessing they were normalised with."""
    # data.check_images decodes every file: each rank decodes its share, all drop the same files
    with images_checked_with(lambda paths: map_sharded(check_images, paths)):
        data = build_datasets(cfg.data, seed=cfg.seed)
    _check_model_fits_data(cfg, data.meta)
    if resume_from is None:
        init_source = weights.read_init_from(cfg)
        meta = weights.preprocessing_meta(data.meta, init_source, cfg)  # normalise as the init weights expect
    else:
        init_source, meta = None, weights.resumed_preprocessing_meta(data.meta, resume_from, cfg)
    kw: dict[str, Any] = {"device": device, "seed": cfg.seed, "rank": dist.rank,
                          "world_size": dist.world_size, "channels_last": cfg.train.channels_last}
    evaluation = {"train": False, "batch_size": cfg.train.eval_batch_size, **kw}
    train = build_loader(data.train, meta, cfg.data, train=True, batch_size=cfg.train.batch_size, **kw)
    if len(train) == 0:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the training split")
    val = build_loader(data.val, meta, cfg.data, **evaluation) if data.val is not None else None
    test = (build_loader(data.test, meta, cfg.data, **evaluation)
            if cfg.train.test_every_epoch and data.test is not None else None)
    return Loaders(data, train, val, test, kw, meta, init_source)


def _resumes(cfg: Config) -> bool:
    """The run continues a run folder's checkpoint (``train.resume=auto`` and ``last.pt`` there)."""
    if cfg.train.resume != "auto" or cfg.run.name is None:  # no name: a new, timestamped folder
        return False
    return ckpt.latest(Path(cfg.run.root).expanduser() / cfg.run.name) is not None


def _check_model_fits_data(cfg: Config, meta: DataMeta) -> None:
    """``model.num_classes``/``in_chans``, when set, must be the dataset's."""
    n, c = len(meta.classes), meta.in_chans
    if cfg.model.num_classes is not None and cfg.model.num_classes != n:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes} does not match the data: "
                          f"{cfg.data.name} has {n} classes (leave it unset to follow the data)")
    if cfg.model.in_chans is not None and cfg.model.in_chans != c:
        raise ConfigError(f"model.in_chans={cfg.model.in_chans} does not match the data: {cfg.data.name} "
                          f"images have {c} channel(s) (leave it unset to follow the data)")


def build_training(cfg: Config, loaders: Loaders, device: torch.device, *,
                   init: bool = True) -> tuple[TrainParts, nn.Module]:
    """Model (seeded: the same init on every rank and for every resume; ``model.init_from``
    weights when ``init``, i.e. not resuming), optimiser over its param groups, EMA, scaler."""
    seed_everything(cfg.seed)
    model: nn.Module = build_model(cfg, loaders.meta)  # then wrapped: to(), init weights
    if init:
        model = weights.apply_init_from(model, loaders.init_source, loaders.meta)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim, build_param_groups(model, cfg.optim, cfg.train))
    ema = ModelEMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
    scaler = torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None
    if (warning := fp16_sync_warning(cfg, optimizer, device)) is not None:
        log.warning("%s", warning)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    return TrainParts(model, optimizer, ema, scaler, SumMeter(device)), criterion


def fp16_sync_warning(cfg: Config, optimizer: torch.optim.Optimizer, device: torch.device) -> str | None:
    """The warning for fp16 AMP with an unfused optimiser on a GPU (None when it does not apply):
    GradScaler then unscales and reads the inf/NaN check on the host every step, a device sync;
    torch's fused SGD/AdamW take the scaler's state and keep that check on the device."""
    if cfg.train.amp != "fp16" or device.type != "cuda" or optimizer.defaults.get("fused"):
        return None
    return ("train.amp=fp16 with an unfused optimiser: GradScaler reads its inf/NaN check on the host "
            "every step (a device sync); optim.fused=true (float parameters on one GPU) keeps the check "
            "on the device, or use train.amp=bf16, which needs no scaler")


def resume(ckpts: Checkpointer, parts: TrainParts, state: TrainState, cfg: Config) -> None:
    """Restore the run folder's last checkpoint, if resuming and there is one."""
    path = ckpts.resume_path()
    if path is None:
        return
    ckpts.restore(path, parts, state, cfg)
    log.info("resumed from %s at epoch %d, batch %d (step %d)", path, state.epoch + 1, state.batch, state.step)


def start_run(cfg: Config, dist: DistInfo, device: torch.device, ckpts: Checkpointer, loaders: Loaders,
              parts: TrainParts, criterion: nn.Module, state: TrainState,
              on_step: Callable[[dict[str, Any]], bool | None] | None) -> Run:
    """Wrap the model (DDP, compile), fix the intervals, write config.yaml: the run has started."""
    steps_per_epoch = len(loaders.train)
    if state.batch == 0 and state.step != state.epoch * steps_per_epoch:
        # another batch size at an epoch boundary: the schedule continues at the same epoch
        log.warning("steps per epoch changed to %d (train.batch_size); step %d becomes %d so the "
                    "learning-rate schedule continues at epoch %d", steps_per_epoch, state.step,
                    state.epoch * steps_per_epoch, state.epoch + 1)
        state.step = state.epoch * steps_per_epoch
    freeze_for_epoch(parts.model, cfg.train, state.epoch)  # before DDP: it reduces what requires grad
    net = wrap_ddp(parts.model, dist, device, cfg.train.sync_bn)
    freeze_for_epoch(unwrap(net), cfg.train, state.epoch)  # again on SyncBN's new BN layers
    net = _compiled(net, cfg)
    sync_every = sync_interval(cfg.train, device)
    every = checkpoint_interval(cfg.train.checkpoint_every_steps, sync_every)
    if every != cfg.train.checkpoint_every_steps:
        log.info("train.checkpoint_every_steps=%d rounded up to %d, a multiple of the sync interval "
                 "(train.sync_every=%d): saves need every rank's agreement that all is finite",
                 cfg.train.checkpoint_every_steps, every, sync_every)
    total_steps = cfg.train.epochs * steps_per_epoch
    ckpts.write_config(cfg)
    ckpts.set_probe(loaders.val)  # every save checks its forward pass on these validation images
    run = Run(cfg, dist, device, ckpts, loaders, parts, net, criterion, state,
              StepGuard(device, dist, sync_every, on_step),
              lambda s: lr_at(s, total_steps, steps_per_epoch, cfg.optim), steps_per_epoch, every,
              RunLog(cfg, ckpts.run_dir, dist))
    log.info("run folder %s | %s on %s | %d train / %s val images | %d steps/epoch",
             ckpts.run_dir, cfg.model.name, device, _count(loaders.data.train),
             _count(loaders.data.val) if loaders.data.val is not None else "no", steps_per_epoch)
    return run


def run_epoch(run: Run) -> Result | None:
    """Train one epoch (or its rest), validate, log, checkpoint; a Result when stopped early."""
    cfg, state, parts = run.cfg, run.state, run.parts
    epoch = state.epoch
    if freeze_for_epoch(unwrap(run.net), cfg.train, epoch) and run.dist.enabled:  # two-phase unfreeze
        run.net = _compiled(wrap_ddp(unwrap(run.net), run.dist, run.device, sync_bn=False), cfg)  # BN converted
    if state.batch == 0:
        parts.meter.sums.zero_()
    progress = Progress(cfg, run.dist, epoch, run.steps_per_epoch, state.batch)
    out = train_one_epoch(
        run.net, run.loaders.train, parts.optimizer, run.criterion, epoch=epoch, start_batch=state.batch,
        step=state.step, lr_fn=run.lr_fn, meter=parts.meter, amp=cfg.train.amp, scaler=parts.scaler,
        clip_grad_norm=cfg.optim.clip_grad_norm, ema=parts.ema,
        after_step=lambda info: _after_step(run, info, progress))
    progress.close()
    run.guard.sync(state.step)  # every rank agrees on NaN and stop before anything is saved
    if run.guard.bad_step is not None:
        raise _non_finite(run, f"non-finite loss at step {run.guard.bad_step}")
    if out["stopped"] and state.batch < run.steps_per_epoch:
        return _stop(run)
    state.epoch, state.batch = epoch + 1, 0
    row = epoch_row(epoch, state, run.lr_fn, all_reduce_sum(parts.meter.sums.clone()), out, run.dist)
    row.update(_validate(run, epoch))
    run.ckpts.save(ckpt.LAST, parts, state, cfg, run.meta.to_dict())
    run.log.epoch(row)
    # A stop that arrived on the epoch's last steps, or on any rank during validation and the save
    # (seconds long): decided together, or the ranks it reached would leave while the others wait
    # in the next epoch's collectives until the process group's timeout.
    reason = run.guard.agree()
    if reason is not None:
        run.log.interrupted(reason, state)
        return Result(run.ckpts.run_dir, state.epoch, state.step, run.val, state.best(), None, reason)
    return None


def _compiled(net: nn.Module, cfg: Config) -> nn.Module:
    """``torch.compile(net)`` with ``train.compile_backend`` when ``train.compile``, else ``net``."""
    if not cfg.train.compile:
        return net
    backends = torch._dynamo.list_backends(exclude_tags=())
    if cfg.train.compile_backend not in backends:
        raise ConfigError(f"train.compile_backend={cfg.train.compile_backend!r} is not a torch.compile "
                          f"backend; use one of {', '.join(backends)}")
    return cast(nn.Module, torch.compile(net, backend=cfg.train.compile_backend))  # an nn.Module subclass


def _after_step(run: Run, info: dict[str, Any], progress: Progress) -> bool:
    """Per-step bookkeeping; True stops the epoch (a stop request or a non-finite loss)."""
    run.state.step, run.state.batch = info["step"], info["batch"] + 1
    verdict = run.guard.after_step(info)
    # The step loss is read only where the guard read its flags (no host read of its own)
    loss = run.guard.window_loss if verdict != CONTINUE else None
    progress.update(info, loss)
    if loss is not None:
        run.log.step_loss(info["step"], loss)  # mean over the sync window
    if verdict == STOP:
        return True
    if (verdict == SYNCED and run.checkpoint_every and info["step"] % run.checkpoint_every == 0
            and run.state.batch < run.steps_per_epoch):
        run.ckpts.save(ckpt.LAST, run.parts, run.state, run.cfg, run.meta.to_dict())
    return False


def _stop(run: Run) -> Result:
    """Save mid-epoch and report the interruption (every rank reaches this at the same step)."""
    run.ckpts.save(ckpt.LAST, run.parts, run.state, run.cfg, run.meta.to_dict())
    run.log.interrupted(run.guard.reason, run.state)
    return Result(run.ckpts.run_dir, run.state.epoch, run.state.step, run.val, run.state.best(), None,
                  run.guard.reason)


def _non_finite(run: Run, what: str) -> NonFiniteLossError:
    s = run.state
    return NonFiniteLossError(
        f"{what} (epoch {s.epoch + 1}, batch {s.batch} of {run.steps_per_epoch}); training stopped. "
        f"Last good checkpoint: {run.ckpts.last_good or 'none saved yet'}. "
        f"Try a lower optim.lr or set optim.clip_grad_norm.")


def _validate(run: Run, epoch: int) -> dict[str, float]:
    """Validation (every ``eval_every`` epochs and the last; best.pt on a new best) and the
    per-epoch test curve; a non-finite loss stops the run before anything is saved."""
    cfg, row = run.cfg, {}
    if run.loaders.val is not None and ((epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs):
        run.val = evaluate(run.eval_net, run.loaders.val, device=run.device, amp=cfg.train.amp)
        if not math.isfinite(run.val["loss"]):
            raise _non_finite(run, "non-finite validation loss")
        row.update({f"val_{k}": v for k, v in run.val.items() if k != "count"})
        if run.val["top1_err"] < run.state.best_val_err:
            run.state.best_val_err, run.state.best_epoch = run.val["top1_err"], epoch + 1
            run.ckpts.save(ckpt.BEST, run.parts, run.state, cfg, run.meta.to_dict())
    if run.loaders.test_every_epoch is not None:  # curves for figures only: never used to choose weights
        test = evaluate(run.eval_net, run.loaders.test_every_epoch, device=run.device, amp=cfg.train.amp)
        if not math.isfinite(test["loss"]):
            raise _non_finite(run, "non-finite test loss")
        row.update({f"test_{k}": v for k, v in test.items() if k != "count"})
    return row


def finish(run: Run) -> Result:
    """The test split once (with the weights validation chose), result.json, close the run's log."""
    test = _final_test(run)
    result = Result(run.ckpts.run_dir, run.state.epoch, run.state.step, run.val, run.state.best(), test)
    # each rank's loaders found the unreadable files of its own shard: result.json lists them all
    skipped = sorted({f: r for rank in all_gather_object(run.loaders.data.bad_files()) for f, r in rank}.items())
    if run.dist.is_main:
        _write_result(run.ckpts.run_dir, result, skipped)
    run.log.close()
    barrier()
    return result


def _count(split: Any) -> int:
    return int(split.labels.shape[0])


def _result_of_finished_run(run_dir: Path, state: TrainState, doc: dict[str, Any]) -> Result:
    return Result(run_dir, state.epoch, state.step, doc.get("val") or {}, doc.get("best") or {},
                  doc.get("test"))


def _final_test(run: Run) -> dict[str, Any] | None:
    """Evaluate the test split once, with the weights validation chose (best.pt) if any."""
    cfg, data = run.cfg, run.loaders.data
    if not cfg.train.test_at_end or data.test is None:
        return None
    barrier()  # rank 0 has finished writing best.pt before any rank reads it
    best = run.ckpts.path(ckpt.BEST)
    use_best = run.loaders.val is not None and best.is_file()  # decided once: the file may appear meanwhile
    model = unwrap(run.eval_net)
    current = {k: v.clone() for k, v in model.state_dict().items()} if use_best else None
    if use_best:
        state = ckpt.model_state(ckpt.load_checkpoint(best, map_location=run.device), best)
        ckpt.load_weights(model, state, source=str(best))
    loader = run.loaders.test_every_epoch or build_loader(
        data.test, run.meta, cfg.data, train=False, batch_size=cfg.train.eval_batch_size, **run.loaders.kwargs)
    test: dict[str, Any] = dict(evaluate(model, loader, device=run.device, amp=cfg.train.amp,
                                         tta_flip=cfg.train.test_tta == "flip"))
    if current is not None:
        model.load_state_dict(current)
    if not math.isfinite(test["loss"]):
        raise _non_finite(run, "non-finite test loss")
    test["weights"] = "best" if use_best else "last"
    return test


def _write_result(run_dir: Path, result: Result, skipped: list[tuple[str, str]]) -> None:
    doc = {"run_dir": str(run_dir), "epochs": result.epochs, "steps": result.steps,
           "val": result.val, "best": result.best, "test": result.test,
           "skipped_images": [{"file": f, "reason": r} for f, r in skipped]}
    ckpt.atomic_write(run_dir / "result.json", lambda f: f.write(json.dumps(doc, indent=2).encode()))
    if skipped:
        log.warning("skipped %d unreadable image(s); listed in %s", len(skipped), run_dir / "result.json")


def resume_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config to continue ``run_dir`` with: its config.yaml, then ``overrides``, resume=auto.

    Only :data:`~resnetlab.config.RESUMABLE_KEYS` may change (epochs, device, logging, workers);
    a key that defines the run (seed, data and its split, model, batch size, optimiser, run.name)
    is refused naming the key and the run's value. The run folder's own name and parent are set
    as typed values (never re-parsed as YAML: a folder named ``0x10`` or ``null`` stays that string).
    """
    from resnetlab.config import load, override_pairs, resume_changes

    run_dir = Path(run_dir).expanduser()
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.yaml)")
    for key, _ in override_pairs(overrides):
        if key.startswith("run."):
            raise ConfigError(f"{key} cannot change when resuming {run_dir}: resuming continues that "
                              "folder; start another run instead of resuming this one")
    saved = load(path)
    cfg = load(path, list(overrides))
    resume_changes(saved, cfg, str(run_dir))
    return validate(replace(cfg, run=replace(cfg.run, root=str(run_dir.parent), name=run_dir.name),
                            train=replace(cfg.train, resume="auto")))
