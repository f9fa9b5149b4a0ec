"""``fit(config)``: the one place that wires data, model, optimiser, loop and checkpoints.

It reads like the recipe in DESIGN.md: run folder -> data -> model -> optimiser -> resume ->
epochs of (train, validate, log, checkpoint) -> test once -> result.json.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from resnetlab import (
    __version__,
    weights,  # module import: weights imports engine.checkpoint, a cycle otherwise
)
from resnetlab.config import Config, ConfigError, to_dict
from resnetlab.data import DataMeta, build_datasets, build_loader
from resnetlab.engine import checkpoint as ckpt
from resnetlab.engine.dist import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    init_from_env,
    unwrap,
    wrap_ddp,
)
from resnetlab.engine.freeze import freeze_for_epoch
from resnetlab.engine.loop import evaluate, train_one_epoch
from resnetlab.engine.metrics import SumMeter, append_jsonl, read_jsonl, write_csv
from resnetlab.engine.optim import ModelEMA, build_optimizer, build_param_groups, lr_at
from resnetlab.models import create_model

log = logging.getLogger("resnetlab")

EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130}  # 128 + signal number, as shells report


class TrainingError(RuntimeError):
    """Training cannot go on; the message says where and what to do."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


@dataclass
class Result:
    """What ``train()`` returns: where the run lives and its final numbers."""

    run_dir: Path
    epochs: int  # epochs completed
    steps: int  # optimiser steps completed
    val: dict[str, float] = field(default_factory=dict)  # last validation
    best: dict[str, Any] = field(default_factory=dict)  # best validation and its epoch
    test: dict[str, float] | None = None  # test split, evaluated once with the chosen weights
    interrupted: str | None = None  # "SIGTERM" / "SIGINT" / "stop" when stopped early

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.interrupted or "", 0)


# ----------------------------------------------------------------------------------------------
# small pieces


def select_device(name: str) -> torch.device:
    """``auto``: cuda, then mps, then cpu; otherwise the named device, checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: {name!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name}: CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_run_name(cfg: Config) -> str:
    return f"{cfg.model.name}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_model(cfg: Config, meta: DataMeta) -> nn.Module:
    """The network the config names, sized for the dataset (classes, channels)."""
    kw: dict[str, Any] = {
        "num_classes": cfg.model.num_classes or len(meta.classes),
        "in_chans": cfg.model.in_chans or meta.in_chans,
        "zero_init_residual": cfg.model.zero_init_residual,
        "grad_checkpointing": cfg.model.grad_checkpointing,
        "checkpoint_every": cfg.model.checkpoint_every,
        "checkpoint_stages": cfg.model.checkpoint_stages,
        "drop_rate": cfg.model.drop_rate,
    }
    if cfg.model.shortcut is not None:
        kw["shortcut"] = cfg.model.shortcut
    return create_model(cfg.model.name, **kw)


class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves, and returns."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._old: dict[int, Any] = {}

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, lambda s, _f: self.request(signal.Signals(s).name))
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _params_finite(model: nn.Module) -> bool:
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())


# ----------------------------------------------------------------------------------------------
# the recipe


def fit(cfg: Config, *, on_step: Callable[[dict[str, Any]], bool | None] | None = None) -> Result:
    """Train ``cfg`` end to end and return a :class:`Result`; see DESIGN.md for the data flow.

    ``on_step(info)`` is called after every optimiser step with ``epoch``, ``batch``, ``step``,
    ``lr``, ``loss`` (a tensor) and ``model``; returning True stops training as a signal
    would (checkpoint saved, ``Result.interrupted == "stop"``).
    """
    device = select_device(cfg.train.device)
    dist = init_from_env(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)

    cfg = weights.resolve_init_from(cfg)  # model.init_from as a file path + its SHA-256, for config.yaml
    run_dir = _prepare_run_dir(cfg, dist)
    resume_from = ckpt.latest(run_dir) if cfg.train.resume == "auto" else None

    data = build_datasets(cfg.data, seed=cfg.seed)
    init_source = weights.read_init_from(cfg)
    meta = weights.preprocessing_meta(data.meta, init_source, cfg)  # normalise as the init weights expect
    loader_kw = {"device": device, "seed": cfg.seed, "rank": dist.rank, "world_size": dist.world_size,
                 "channels_last": cfg.train.channels_last}
    train_loader = build_loader(data.train, meta, cfg.data, train=True, batch_size=cfg.train.batch_size, **loader_kw)
    val_loader = (build_loader(data.val, meta, cfg.data, train=False, batch_size=cfg.train.eval_batch_size, **loader_kw)
                  if data.val is not None else None)
    test_loader = (build_loader(data.test, meta, cfg.data, train=False, batch_size=cfg.train.eval_batch_size, **loader_kw)
                   if cfg.train.test_every_epoch and data.test is not None else None)
    if len(train_loader) == 0:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is larger than the training split")

    seed_everything(cfg.seed)  # same init on every rank, and for every resume
    model = build_model(cfg, meta)
    if resume_from is None:
        model = weights.apply_init_from(model, init_source, meta)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim, build_param_groups(model, cfg.optim, cfg.train))
    ema = ModelEMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
    scaler = torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

    steps_per_epoch = len(train_loader)
    total_steps = cfg.train.epochs * steps_per_epoch
    state = {"epoch": 0, "batch": 0, "step": 0, "best_val_err": math.inf, "best_epoch": 0}
    meter = SumMeter(device)
    if resume_from is not None:
        loaded = ckpt.load_checkpoint(resume_from, map_location=device)
        _restore(loaded, model, optimizer, ema, scaler, meter, state)
        log.info("resumed from %s at epoch %d, batch %d (step %d)",
                 resume_from, state["epoch"] + 1, state["batch"], state["step"])

    freeze_for_epoch(model, cfg.train, state["epoch"])  # before DDP: it reduces what requires grad
    net = wrap_ddp(model, dist, device, cfg.train.sync_bn)
    freeze_for_epoch(unwrap(net), cfg.train, state["epoch"])  # again on SyncBN's new BN layers
    if cfg.train.compile:
        net = torch.compile(net)
    # Evaluate the plain module: ranks hold shards of unequal length, and a DDP forward could
    # wait on a collective that a rank with one batch fewer never joins.
    eval_net = ema.module if ema is not None else unwrap(net)

    def checkpoint_state() -> dict[str, Any]:
        return {
            "model": unwrap(net).state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "meter": meter.state_dict(),
            "rng": ckpt.rng_state(),
            "state": dict(state),
            "config": to_dict(cfg),
            "meta": meta.to_dict(),
            "version": __version__,
        }

    def save(name: str) -> None:
        """Rank 0 writes ``checkpoints/<name>`` atomically, never with non-finite weights."""
        if not dist.is_main:
            return
        if not _params_finite(unwrap(net)):
            raise NonFiniteLossError(
                f"weights are not finite at epoch {state['epoch'] + 1}, step {state['step']}; "
                f"not saving over {run_dir / ckpt.CHECKPOINT_DIR / name}")
        ckpt.save_checkpoint(checkpoint_state(), run_dir / ckpt.CHECKPOINT_DIR / name)

    # Per-step checks that must not make the GPU wait: a non-finite loss is recorded on the
    # device and read by the host every `sync_every` steps (every step on CPU, where it is free).
    sync_every = 1 if device.type == "cpu" else 20
    flags = torch.zeros(2, device=device)  # [first non-finite step + 1 (0 = none), stop requested]
    stop = _StopFlag()
    last_good = [ckpt.latest(run_dir)]

    def after_step(info: dict[str, Any]) -> bool:
        state["step"], state["batch"] = info["step"], info["batch"] + 1
        bad = ~torch.isfinite(info["loss"])
        flags[0] = torch.where(bad & (flags[0] == 0), float(info["step"]), flags[0])
        user_stop = bool(on_step(info)) if on_step is not None else False
        if user_stop:
            stop.request("stop")
        if info["step"] % sync_every and not stop.reason:
            return False
        flags[1] = float(stop.reason is not None)
        all_reduce_sum(flags)  # any rank's NaN or signal stops every rank at the same step
        if flags[0] > 0:
            bad_step = int(flags[0].item()) if not dist.enabled else info["step"]
            raise NonFiniteLossError(
                f"non-finite loss at epoch {info['epoch'] + 1}, step {bad_step} "
                f"(batch {info['batch'] + 1} of {steps_per_epoch}); training stopped. "
                f"Last good checkpoint: {last_good[0] or 'none saved yet'}. "
                f"Try a lower optim.lr or set optim.clip_grad_norm.")
        if flags[1] > 0:
            stop.request(stop.reason or "SIGTERM")
            return True
        every = cfg.train.checkpoint_every_steps
        if every and info["step"] % every == 0 and state["batch"] < steps_per_epoch:
            save(ckpt.LAST)
            last_good[0] = run_dir / ckpt.CHECKPOINT_DIR / ckpt.LAST
        return False

    writer = _tensorboard(cfg, run_dir, dist)
    log.info("run folder %s | %s on %s | %d train / %s val images | %d steps/epoch",
             run_dir, cfg.model.name, device, _count(data.train),
             _count(data.val) if data.val is not None else "no", steps_per_epoch)
    lr_fn = lambda s: lr_at(s, total_steps, steps_per_epoch, cfg.optim)  # noqa: E731
    val: dict[str, float] = {}
    with stop:
        while state["epoch"] < cfg.train.epochs:
            epoch = state["epoch"]
            if freeze_for_epoch(unwrap(net), cfg.train, epoch) and dist.enabled:  # two-phase unfreeze
                net = wrap_ddp(unwrap(net), dist, device, sync_bn=False)  # BN already converted
                if cfg.train.compile:
                    net = torch.compile(net)
            if state["batch"] == 0:
                meter.sums.zero_()
            progress = _Progress(cfg, dist, epoch, steps_per_epoch, state["batch"])
            out = train_one_epoch(
                net, train_loader, optimizer, criterion, epoch=epoch, start_batch=state["batch"],
                step=state["step"], lr_fn=lr_fn, meter=meter, amp=cfg.train.amp, scaler=scaler,
                clip_grad_norm=cfg.optim.clip_grad_norm, ema=ema,
                after_step=lambda info, bar=progress: bar.update(info) or after_step(info))
            progress.close()
            if out["stopped"] and state["batch"] < steps_per_epoch:
                save(ckpt.LAST)
                _say_interrupted(stop.reason, run_dir, state, dist)
                return Result(run_dir, epoch, state["step"], val, _best(state), None, stop.reason)
            state.update(epoch=epoch + 1, batch=0)
            train_stats = all_reduce_sum(meter.sums.clone())
            row = _epoch_row(epoch, state, lr_fn, train_stats, out, dist)
            if val_loader is not None and ((epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs):
                val = evaluate(eval_net, val_loader, device=device, amp=cfg.train.amp)
                row.update({f"val_{k}": v for k, v in val.items() if k != "count"})
                if val["top1_err"] < state["best_val_err"]:
                    state.update(best_val_err=val["top1_err"], best_epoch=epoch + 1)
                    save(ckpt.BEST)
            if test_loader is not None:  # curves for figures only: never used to choose weights
                test = evaluate(eval_net, test_loader, device=device, amp=cfg.train.amp)
                row.update({f"test_{k}": v for k, v in test.items() if k != "count"})
            save(ckpt.LAST)
            last_good[0] = run_dir / ckpt.CHECKPOINT_DIR / ckpt.LAST
            _log_epoch(row, run_dir, dist, writer)
            if stop.reason:  # a signal that arrived on the epoch's last step
                _say_interrupted(stop.reason, run_dir, state, dist)
                return Result(run_dir, epoch + 1, state["step"], val, _best(state), None, stop.reason)

    test = _final_test(cfg, data, meta, eval_net, run_dir, device, loader_kw, val_loader is not None,
                       test_loader)
    result = Result(run_dir, state["epoch"], state["step"], val, _best(state), test)
    if dist.is_main:
        _write_result(run_dir, result, data.bad_files())
    if writer is not None:
        writer.close()
    barrier()
    return result


def _count(split: Any) -> int:
    return int(split.labels.shape[0])


def _best(state: dict[str, Any]) -> dict[str, Any]:
    if math.isinf(state["best_val_err"]):
        return {}
    return {"val_top1_err": state["best_val_err"], "epoch": state["best_epoch"]}


def _prepare_run_dir(cfg: Config, dist: DistInfo) -> Path:
    """Create ``run.root/run.name`` (name agreed across ranks) and write ``config.yaml``.

    An existing run with checkpoints is never overwritten: continue it with
    ``train.resume=auto`` (or ``--resume``), or choose another ``run.name``.
    """
    name = broadcast_object(cfg.run.name or default_run_name(cfg))
    run_dir = Path(cfg.run.root).expanduser() / name
    has_ckpt = ckpt.latest(run_dir) is not None
    if has_ckpt and cfg.train.resume != "auto":
        raise TrainingError(
            f"{run_dir} already holds a training run; resume it with "
            f"`resnetlab train --resume {run_dir}` (train.resume=auto) or pick another run.name")
    if dist.is_main:
        (run_dir / ckpt.CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        resolved = replace(cfg, run=replace(cfg.run, name=name))
        text = yaml.safe_dump(to_dict(resolved), sort_keys=False)
        ckpt.atomic_write(run_dir / "config.yaml", lambda f: f.write(text.encode()))
    barrier()
    return run_dir


def _restore(loaded: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, ema: Any,
             scaler: Any, meter: SumMeter, state: dict[str, Any]) -> None:
    """Put every piece of a checkpoint back so the run continues bitwise as if never stopped."""
    ckpt.load_weights(model, loaded["model"], source="checkpoint")
    optimizer.load_state_dict(loaded["optimizer"])
    if ema is not None and loaded.get("ema") is not None:
        ema.load_state_dict(loaded["ema"])
    if scaler is not None and loaded.get("scaler") is not None:
        scaler.load_state_dict(loaded["scaler"])
    meter.load_state_dict(loaded["meter"])
    state.update(loaded["state"])
    ckpt.set_rng_state(loaded["rng"])


class _Progress:
    """tqdm bar for one epoch: loss, images/s, ETA. Off when quiet, not a tty, or not rank 0."""

    def __init__(self, cfg: Config, dist: DistInfo, epoch: int, total: int, start: int) -> None:
        self.bar = None
        if cfg.train.quiet or not dist.is_main or not sys.stderr.isatty():
            return
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                        unit="batch", leave=False, dynamic_ncols=True)
        self.t0, self.images, self.batch_size = time.perf_counter(), 0, cfg.train.batch_size

    def update(self, info: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        self.images += self.batch_size
        if info["batch"] % 10 == 0:  # reading the loss waits for the device: not every step
            rate = self.images / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix(loss=f"{info['loss'].item():.3f}", img_s=f"{rate:.0f}", lr=f"{info['lr']:.3g}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _epoch_row(epoch: int, state: dict[str, Any], lr_fn: Callable[[int], float], sums: torch.Tensor,
               out: dict[str, Any], dist: DistInfo) -> dict[str, Any]:
    loss_sum, c1, _c5, n = sums.tolist()
    images_per_s = out["images"] * dist.world_size / max(out["seconds"], 1e-9)
    return {"epoch": epoch + 1, "step": state["step"], "lr": lr_fn(max(state["step"] - 1, 0)),
            "train_loss": loss_sum / max(n, 1), "train_err": 100.0 * (1 - c1 / max(n, 1)),
            "images_per_s": images_per_s, "seconds": out["seconds"]}


def _log_epoch(row: dict[str, Any], run_dir: Path, dist: DistInfo, writer: Any) -> None:
    if not dist.is_main:
        return
    append_jsonl(run_dir / "metrics.jsonl", row)
    write_csv(run_dir / "summary.csv", read_jsonl(run_dir / "metrics.jsonl"))
    val = f" | val loss {row['val_loss']:.4f} err {row['val_top1_err']:.2f}%" if "val_loss" in row else ""
    log.info("epoch %d | lr %.4g | train loss %.4f err %.2f%%%s | %.0f img/s, %.1fs",
             row["epoch"], row["lr"], row["train_loss"], row["train_err"], val, row["images_per_s"], row["seconds"])
    if writer is not None:
        for k, v in row.items():
            if k not in ("epoch", "step"):
                writer.add_scalar(tensorboard_tag(k), v, row["epoch"])
        writer.flush()


# metrics.jsonl column -> TensorBoard tag: grouped sections so runs compare side by side
_TB_TAGS = {"lr": "opt/lr", "images_per_s": "speed/images_per_s", "seconds": "speed/epoch_seconds"}


def tensorboard_tag(column: str) -> str:
    """``train_loss`` -> ``train/loss``, ``val_top1_err`` -> ``val/top1_err``, ``lr`` -> ``opt/lr``."""
    if column in _TB_TAGS:
        return _TB_TAGS[column]
    for split in ("train", "val", "test"):
        if column.startswith(split + "_"):
            return f"{split}/{column[len(split) + 1:]}"
    return f"other/{column}"


def _hparams(cfg: Config) -> dict[str, Any]:
    """Flat ``section.key -> value`` of the config, as TensorBoard's HParams tab takes them."""
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (bool, int, float, str)):
                out[f"{prefix}{k}"] = v
            else:  # None, lists: shown as text
                out[f"{prefix}{k}"] = str(v)
    walk(to_dict(cfg), "")
    return out


def _tensorboard(cfg: Config, run_dir: Path, dist: DistInfo) -> Any:
    """Rank 0's event writer (None when off or not installed), with the config as hparams.

    Epoch scalars go under ``train/``, ``val/``, ``test/``, ``opt/`` and ``speed/``; the
    per-step loss (``train/loss_step``) comes from :func:`resnetlab.launch.fit_cleanly`. The
    HParams tab lists every config key against the final validation metrics.
    """
    if not (cfg.train.tensorboard and dist.is_main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
    except ImportError:  # tensorboard is optional: `pip install resnetlab[tensorboard]`
        return None
    writer = SummaryWriter(log_dir=str(run_dir / "tb"))
    metrics = {tag: 0.0 for tag in ("val/top1_err", "val/top5_err", "val/loss", "train/err", "train/loss")}
    for summary in hparams(_hparams(cfg), metrics):  # the metrics' values are the scalars of this run
        writer.file_writer.add_summary(summary)
    return writer


def _say_interrupted(reason: str | None, run_dir: Path, state: dict[str, Any], dist: DistInfo) -> None:
    if dist.is_main:
        print(f"{reason}: saved {run_dir / ckpt.CHECKPOINT_DIR / ckpt.LAST} at epoch {state['epoch'] + 1}, "
              f"step {state['step']}; resume with: resnetlab train --resume {run_dir}", file=sys.stderr, flush=True)


def _final_test(cfg: Config, data: Any, meta: DataMeta, eval_net: nn.Module, run_dir: Path,
                device: torch.device, loader_kw: dict[str, Any], have_val: bool,
                loader: Any = None) -> dict[str, float] | None:
    """Evaluate the test split once, with the weights validation chose (best.pt) if any."""
    if not cfg.train.test_at_end or data.test is None:
        return None
    barrier()  # rank 0 has finished writing best.pt before any rank reads it
    best = run_dir / ckpt.CHECKPOINT_DIR / ckpt.BEST
    use_best = have_val and best.is_file()  # decided once: the file may appear meanwhile
    model = unwrap(eval_net)
    current = {k: v.clone() for k, v in model.state_dict().items()} if use_best else None
    if use_best:
        state = ckpt.model_state(ckpt.load_checkpoint(best, map_location=device))
        ckpt.load_weights(model, state, source=str(best))
    loader = loader or build_loader(data.test, meta, cfg.data, train=False,
                                    batch_size=cfg.train.eval_batch_size, **loader_kw)
    test = evaluate(model, loader, device=device, amp=cfg.train.amp)
    if current is not None:
        model.load_state_dict(current)
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
    """The config to continue ``run_dir`` with: its config.yaml, then ``overrides``, resume=auto."""
    from resnetlab.config import load

    run_dir = Path(run_dir).expanduser()
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.yaml)")
    base = [f"run.root={run_dir.parent}", f"run.name={run_dir.name}", "train.resume=auto"]
    return load(path, [*overrides, *base])
