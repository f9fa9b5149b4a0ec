"""Case (scale): multi-node scaling on paper, with the loopback run as its sanity check.

Data-parallel training with a fixed batch per GPU does the same compute per GPU on any number
of nodes and adds one gradient all-reduce per step. The model:

    B        = trainable parameters x 4 bytes (float32 gradients), measured on the model
    T        = one worker's step time (forward, backward, optimiser), measured here
    t_ar(n)  = 2 (G-1)/G * B / W_intra                      intra-node reduce-scatter + all-gather
             + 2 (n-1)/n * B / W_node                       inter-node ring over the n nodes
             + 2 (n-1) * alpha * ceil(B / bucket)           ring latency, per DDP bucket
    step(n)  = T + max(0, t_ar(n) - overlap * T)            DDP overlaps the all-reduce with
                                                            the backward pass (2/3 of T at most)
    E(n)     = T / step(n)                                  scaling efficiency of n nodes x G GPUs

(hierarchical all-reduce, as NCCL does across nodes: every GPU exchanges 1/G of the gradients
through its node's network link, so W_node is the node's total network bandwidth.) Efficiency
is reported without overlap (a lower bound) and with the whole backward available to hide the
all-reduce (an upper bound).

Sanity check on this machine: two gloo processes on 127.0.0.1 ("2 nodes x 1 GPU") train
resnet20 under DDP. Measured there: one process's step time T (same per-process batch and
threads, run alone), the loopback all-reduce bandwidth of a B-byte tensor, and the bytes DDP
actually all-reduces per step (a communication hook counts them; they must equal B). The
model's step(2) with those numbers is set against the measured DDP step time.

    python -m benchmarks.scale_model [--quick] [--device cpu|cuda] [--node-gbit 100]
"""

from __future__ import annotations

import argparse
import math
import os
import queue
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from benchmarks.common import describe_machine, machine_info, pick_device, write_json

NODES = (1, 2, 4, 8, 16, 32, 64)
GPUS_PER_NODE = 8
NODE_GBIT = 100.0  # stated: one 100 Gb/s Ethernet link per node (commodity cluster)
FAST_NODE_GBIT = 3200.0  # stated: 8 x 400 Gb/s InfiniBand per node (a DGX-class H100/H200 node)
INTRA_GBYTE = 150.0  # stated: NVLink bus bandwidth an all-reduce reaches within a node, GB/s
ALPHA_S = 20e-6  # stated: per-hop latency of one inter-node ring step, seconds
BUCKET_BYTES = 25 * 2**20  # DDP's default bucket_cap_mb
BACKWARD_SHARE = 2 / 3  # backward's share of the step: what DDP can overlap the all-reduce with
MODELS = {"resnet50": (224, 32), "resnet20": (32, 128)}  # name -> (image size, batch per worker)


def grad_bytes(model: torch.nn.Module) -> int:
    """Bytes one all-reduce per step moves per worker: every trainable parameter's gradient."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def allreduce_seconds(nbytes: int, nodes: int, gpus_per_node: int, node_gbit: float,
                      intra_gbyte: float = INTRA_GBYTE, alpha_s: float = ALPHA_S) -> float:
    """Modelled time of one hierarchical all-reduce of ``nbytes`` over ``nodes`` x ``gpus_per_node``."""
    g = gpus_per_node
    intra = 2 * (g - 1) / g * nbytes / (intra_gbyte * 1e9) if g > 1 else 0.0
    inter = 2 * (nodes - 1) / nodes * nbytes / (node_gbit * 1e9 / 8) if nodes > 1 else 0.0
    latency = 2 * (nodes - 1) * alpha_s * math.ceil(nbytes / BUCKET_BYTES)
    return intra + inter + latency


def efficiency(step_s: float, comm_s: float, overlap: float) -> float:
    """T / (T + the all-reduce time the backward pass did not hide)."""
    return step_s / (step_s + max(0.0, comm_s - overlap * step_s))


def table(step_s: float, nbytes: int, node_gbit: float, gpus_per_node: int = GPUS_PER_NODE) -> list[dict]:
    """Expected efficiency for 1..64 nodes: no overlap (lower bound) and full backward overlap."""
    rows = []
    for n in NODES:
        comm = allreduce_seconds(nbytes, n, gpus_per_node, node_gbit)
        rows.append({"nodes": n, "gpus": n * gpus_per_node, "allreduce_ms": comm * 1e3,
                     "efficiency_no_overlap": efficiency(step_s, comm, 0.0),
                     "efficiency_overlap": efficiency(step_s, comm, BACKWARD_SHARE)})
    return rows


def measure_step(name: str, image: int, batch: int, device: torch.device, steps: int) -> float:
    """Median seconds of one SGD training step (forward, backward, update) of ``name``."""
    import resnetlab

    torch.manual_seed(0)
    classes = 1000 if image > 64 else 10
    model = resnetlab.create_model(name, num_classes=classes).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, image, image, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=device)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------
# loopback sanity check: 2 gloo processes on this machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_worker(rank: int, port: int, batch: int, steps: int, out: Any) -> None:
    import resnetlab

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = resnetlab.create_model("resnet20")
    nbytes = grad_bytes(model)
    # Bandwidth of the loopback all-reduce itself, with a tensor of exactly B bytes.
    buf = torch.zeros(nbytes // 4)
    tdist.all_reduce(buf)
    ar = []
    for _ in range(5):
        tdist.barrier()
        t0 = time.perf_counter()
        tdist.all_reduce(buf)
        ar.append(time.perf_counter() - t0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    sent = [0]

    def counting_hook(state, bucket):  # noqa: ANN001, ANN202 (DDP checks the annotation objects)
        sent[0] += bucket.buffer().numel() * bucket.buffer().element_size()
        fut = tdist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0] / 2)

    ddp.register_comm_hook(None, counting_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    times = []
    for i in range(steps + 2):
        tdist.barrier()
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
        if i == 1:
            sent[0] = 0
    if rank == 0:
        out.put({"grad_bytes": nbytes, "ddp_bytes_per_step": sent[0] / steps,
                 "allreduce_s": statistics.median(ar), "ddp_step_s": statistics.median(times)})
    tdist.destroy_process_group()


def loopback_check(batch: int, steps: int) -> dict[str, Any]:
    """Measured vs modelled 2-process step on 127.0.0.1 (gloo, 1 thread each)."""
    torch.set_num_threads(1)
    alone = measure_step("resnet20", 32, batch, torch.device("cpu"), steps)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    port = _free_port()
    procs = [ctx.Process(target=_loopback_worker, args=(r, port, batch, steps, out)) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 1800
    while True:
        try:
            got = out.get(timeout=5)
            break
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"loopback DDP processes failed (exit codes {dead}) or timed out") from None
    for p in procs:
        p.join(timeout=60)
    # The model with the loopback's own numbers: 2 "nodes" of 1 worker, the bus bandwidth the
    # B-byte all-reduce reached (2 (n-1)/n * B / t), no latency term (it is inside t) and no
    # overlap (compute and gloo share the same two cores here).
    bandwidth = 2 * (2 - 1) / 2 * got["grad_bytes"] / got["allreduce_s"]  # bytes/s
    comm = allreduce_seconds(got["grad_bytes"], 2, 1, node_gbit=bandwidth * 8 / 1e9, alpha_s=0.0)
    predicted = alone + comm
    return {"model": "resnet20", "batch_per_process": batch, "threads_per_process": 1,
            "step_alone_ms": alone * 1e3, "allreduce_ms": got["allreduce_s"] * 1e3,
            "loopback_gbyte_per_s": bandwidth / 1e9, "grad_bytes": got["grad_bytes"],
            "ddp_bytes_per_step": got["ddp_bytes_per_step"],
            "predicted_step_ms": predicted * 1e3, "measured_step_ms": got["ddp_step_s"] * 1e3,
            "measured_over_predicted": got["ddp_step_s"] / predicted}


# ----------------------------------------------------------------------------------------------


def run(quick: bool = False, device: str = "auto", node_gbit: float = NODE_GBIT,
        step_ms: dict[str, float] | None = None, write: bool = True) -> dict[str, Any]:
    """Case (scale); writes ``results/scale.json``. ``step_ms`` replaces the measured step time of a
    model (e.g. one measured on a GPU elsewhere) by a stated one."""
    import resnetlab

    dev = pick_device(device)
    machine = machine_info(dev)
    print(f"[scale_model] {describe_machine(machine)}", flush=True)
    steps = 3 if quick else 8
    results = []
    for name, (image, batch) in MODELS.items():
        if dev.type == "cpu" and name == "resnet50":
            batch = 4 if quick else 8  # a GPU's 32 images at 224 px take ~6 s per step on 2 cores
        nbytes = grad_bytes(resnetlab.create_model(name, num_classes=1000 if image > 64 else 10))
        stated = (step_ms or {}).get(name)
        step = stated / 1e3 if stated else measure_step(name, image, batch, dev, steps)
        row: dict[str, Any] = {"model": name, "step_time": "stated" if stated else f"measured on {dev.type}", "image_size": image, "batch_per_worker": batch, "step_ms": step * 1e3,
               "grad_bytes": nbytes, "node_gbit": node_gbit,
               "nodes": table(step, nbytes, node_gbit), "nodes_fast_network": table(step, nbytes, FAST_NODE_GBIT)}
        results.append(row)
        e64 = row["nodes"][-1]
        print(f"[scale] {name}: step {step * 1e3:.1f} ms on {dev.type}, {nbytes / 2**20:.1f} MiB of gradients; "
              f"64x{GPUS_PER_NODE} at {node_gbit:g} Gb/s: efficiency {e64['efficiency_no_overlap']:.2f}"
              f"-{e64['efficiency_overlap']:.2f}", flush=True)
    check = loopback_check(batch=32 if quick else 64, steps=steps)
    print(f"[scale] loopback 2 x resnet20: measured {check['measured_step_ms']:.1f} ms/step, modelled "
          f"{check['predicted_step_ms']:.1f} ms ({check['measured_over_predicted']:.2f}x); DDP all-reduced "
          f"{check['ddp_bytes_per_step']:.0f} B/step, parameters {check['grad_bytes']} B", flush=True)
    payload = {"case": "scale", "title": "multi-node scaling model", "machine": machine, "quick": quick,
               "assumptions": {"gpus_per_node": GPUS_PER_NODE, "node_gbit": node_gbit,
                               "fast_node_gbit": FAST_NODE_GBIT, "intra_node_gbyte": INTRA_GBYTE,
                               "alpha_s": ALPHA_S, "bucket_bytes": BUCKET_BYTES,
                               "backward_share": BACKWARD_SHARE},
               "results": results, "loopback": check}
    if write:
        write_json("scale", payload)
    return payload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer timed steps")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--node-gbit", type=float, default=NODE_GBIT, help="network bandwidth per node, Gb/s")
    p.add_argument("--step-ms", action="append", default=[], metavar="MODEL=MS",
                   help="use this step time for MODEL instead of measuring it (repeatable)")
    args = p.parse_args(argv)
    try:
        stated = {k: float(v) for k, v in (item.split("=", 1) for item in args.step_ms)}
    except ValueError:
        p.error(f"--step-ms takes MODEL=MILLISECONDS, got {args.step_ms}")
    unknown = sorted(set(stated) - set(MODELS))
    if unknown:
        p.error(f"--step-ms: unknown model {unknown[0]}; choose from {', '.join(MODELS)}")
    payload = run(args.quick, args.device, args.node_gbit, stated)
    for r in payload["results"]:
        print(f"\n{r['model']} (step {r['step_ms']:.1f} ms, {r['grad_bytes'] / 2**20:.1f} MiB): "
              f"nodes x {GPUS_PER_NODE} GPUs -> efficiency at {r['node_gbit']:g} Gb/s "
              f"[{FAST_NODE_GBIT:g} Gb/s], no overlap .. full overlap")
        for a, b in zip(r["nodes"], r["nodes_fast_network"], strict=True):
            print(f"  {a['nodes']:3d} x {GPUS_PER_NODE}: {a['efficiency_no_overlap']:.2f} .. "
                  f"{a['efficiency_overlap']:.2f}   [{b['efficiency_no_overlap']:.2f} .. "
                  f"{b['efficiency_overlap']:.2f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
