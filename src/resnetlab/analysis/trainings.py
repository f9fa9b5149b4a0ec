"""Many trainings at once: the shared engine room of the experiments (degradation, transfer,
fashion-table, cifar-table, and the training half of landscape and responses).

:func:`run_trainings` trains a list of configs in-process or in ``jobs`` spawned worker
processes and returns a picklable summary per run; a NaN loss is a result (a plain net can
diverge), not a reason to stop the others. :func:`default_jobs` picks the worker count: on CPU
two single-thread processes were 5-7x faster than one two-thread process on 2 cores for the
experiments' tiny (8x8) convolutions, whose per-op work is too small to split across threads.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from resnetlab.analysis.errors import AnalysisError
from resnetlab.analysis.seeds import final_metrics
from resnetlab.config import Config
from resnetlab.engine import NonFiniteLossError, fit
from resnetlab.runtime import select_device

log = logging.getLogger("resnetlab")


def default_jobs(device: str = "auto") -> int:
    """Worker processes: 1 on a GPU (one device), else up to 2 single-thread CPU processes."""
    if select_device(device).type != "cpu":
        return 1
    return max(1, min(2, os.cpu_count() or 1))


def _train_job(cfg: Config) -> dict[str, Any]:
    """Train one config (in a worker process or in-process); a picklable summary comes back.

    A run whose loss becomes NaN is a result of the experiment (a plain net can diverge), not a
    reason to stop the others: it comes back with ``error`` set.
    """
    t0 = time.perf_counter()
    run_dir = Path(cfg.run.root) / str(cfg.run.name)
    try:
        result = fit(cfg)
    except NonFiniteLossError as e:
        return {"run_dir": str(run_dir), "interrupted": None, "error": str(e),
                "wall_seconds": time.perf_counter() - t0}
    return {"run_dir": str(result.run_dir), "interrupted": result.interrupted, "error": None,
            "wall_seconds": time.perf_counter() - t0}


@contextmanager
def _quiet_epochs():
    """Hide fit()'s per-epoch lines while many runs go by; warnings still show."""
    logger = logging.getLogger("resnetlab")
    level = logger.level
    if logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_trainings(cfgs: Sequence[Config], jobs: int = 1) -> list[dict[str, Any]]:
    """Train every config; ``jobs > 1`` uses that many spawned worker processes.

    Returns one dict per config that ran, in the order given: ``run_dir``, ``interrupted``,
    ``error`` (a NaN loss), ``wall_seconds``. Progress goes to the ``resnetlab`` logger as each
    run finishes.
    """
    out: list[dict[str, Any] | None] = [None] * len(cfgs)

    def done(i: int, res: dict[str, Any]) -> None:
        out[i] = res
        n = sum(r is not None for r in out)
        if res["error"]:
            log.warning("[%d/%d] %s seed %d: %s", n, len(cfgs), cfgs[i].model.name, cfgs[i].seed, res["error"])
            return
        try:
            m = final_metrics(res["run_dir"])
            what = f"training error {m['train_err']:.2f}%" + "".join(  # only the splits the run had
                f", {name} error {m[key]:.2f}%" for key, name in (("val_top1_err", "validation"),
                                                                  ("test_top1_err", "test")) if key in m)
        except AnalysisError:
            what = "no finished epoch"
        log.info("[%d/%d] %s seed %d: %s (%.0f s)", n, len(cfgs), cfgs[i].model.name, cfgs[i].seed,
                 what, res["wall_seconds"])

    if jobs <= 1:
        for i, cfg in enumerate(cfgs):
            with _quiet_epochs():
                res = _train_job(cfg)
            done(i, res)
            if res["interrupted"]:
                break
    else:
        # spawn, not fork: a forked child would inherit the parent's OpenMP/intra-op thread pool
        # state, which can hang; spawn starts clean interpreters.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_train_job, cfg): i for i, cfg in enumerate(cfgs)}
            try:
                for fut in as_completed(futures):
                    done(futures[fut], fut.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    return [r for r in out if r is not None]


__all__ = ["default_jobs", "run_trainings"]
