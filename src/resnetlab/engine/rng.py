"""A process's random states as a checkpoint stores them: tensors and plain data, so that
``torch.load(weights_only=True)`` accepts them.

Each rank saves its own states (Python, numpy, torch CPU and its own device's generator);
:func:`pack_rng` / :func:`unpack_rng` are the checkpoint's ``rng`` entry for any number of ranks.
Used by :class:`~resnetlab.engine.checkpointer.Checkpointer`; the checkpoint format
(:mod:`resnetlab.checkpoint`) only carries the entry.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's Python, numpy and torch CPU random states, and its own device's.

    Only ``device``'s generator is saved (not every visible GPU's): each rank saves its own, so
    a checkpoint restores on any number of GPUs, with any ``CUDA_VISIBLE_DEVICES``.
    """
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda" and torch.cuda.is_initialized():
        state["device"] = {"type": "cuda", "state": torch.cuda.get_rng_state(device)}
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    """Inverse of :func:`rng_state`: the device state goes to ``device`` when its type matches.

    Also accepts the older format, whose ``"cuda"`` entry lists every visible GPU's state:
    ``device`` takes its own index's entry when there is one.
    """
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         # .cpu(): a resume loads checkpoints with map_location=the training device
                         "state": {"key": n["key"].cpu().numpy().astype(np.uint32), "pos": int(n["pos"])},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"].cpu())
    if device is None or device.type != "cuda":
        return
    own = state.get("device")
    if own is not None and own.get("type") == "cuda":
        torch.cuda.set_rng_state(own["state"].cpu(), device)
    elif "cuda" in state:  # older checkpoints: one entry per GPU visible to rank 0
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index < len(state["cuda"]):
            torch.cuda.set_rng_state(state["cuda"][index].cpu(), device)


def pack_rng(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The checkpoint's ``rng`` entry: every rank's :func:`rng_state`, in rank order."""
    return {"world_size": len(states), "ranks": list(states)}


def unpack_rng(saved: Mapping[str, Any], rank: int, world_size: int) -> tuple[dict[str, Any] | None, str | None]:
    """``(this rank's saved state or None, a note on what changed)`` from a checkpoint's ``rng``.

    Same world size: each rank gets its own state back. Another world size: ranks that existed
    get their own state; new ranks get None (the caller re-seeds them), and the note says so.
    Older checkpoints hold rank 0's state only: every rank gets it, as they always did.
    """
    if "ranks" not in saved:  # older format: one state, rank 0's
        return dict(saved), None
    ranks = list(saved["ranks"])
    note = None
    if len(ranks) != world_size:
        note = (f"checkpoint saved by {len(ranks)} process(es), resumed by {world_size}: "
                + (f"ranks {len(ranks)}..{world_size - 1} get fresh random states seeded from "
                   f"(seed, rank, step); " if world_size > len(ranks) else "")
                + "dropout and other global-RNG draws will differ from an uninterrupted run "
                  "(batches and augmentation do not: they are seeded per batch)")
    return (ranks[rank] if rank < len(ranks) else None), note


__all__ = ["pack_rng", "rng_state", "set_rng_state", "unpack_rng"]
