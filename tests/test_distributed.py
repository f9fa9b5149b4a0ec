"""DDP under torchrun on CPU (gloo): SyncBN equivalence, checkpoints across process counts, and
an elastic restart after a rank dies.

One in-process check that SyncBN conversion keeps the optimiser's parameters, then two torchrun
launches in all (each costs seconds of start-up on two cores), shared by the tests through
module-scoped fixtures; the one-process references are the session's (conftest.ddp_reference, shared with
tests/test_multinode.py: one 3-epoch run, its folder copied at each epoch end):

- ``two``: a fresh 2-process SyncBN run through the CLI (``-m resnetlab train``), with
  activation checkpointing on (its recomputation repeats the BN all-reduces in backward);
- ``elastic``: a copy of the 1-process epoch-1 run continued for epoch 2 by 2 processes under
  ``--max-restarts=1``, where rank 1 dies once mid-epoch; the restart resumes from the
  mid-epoch checkpoint the 2 processes wrote.

Why ``optim.lr=0.001``, NCHW (``train.channels_last=false``) and 2 steps per epoch in the
comparisons: two correct float32 computations of a step round differently, and a ReLU whose
input lies within rounding of zero then passes a gradient in one and not in the other; at lr 0.1
such runs drift apart chaotically (0.3 after 9 steps). Measured here after 2 steps of batch 512 at
lr 0.001, against one NCHW process: two SyncBN processes differ by 8e-7 (weights) and 5e-7 (BN
statistics); two processes without SyncBN by 1.4e-4 and 2.9e-2; one NHWC process already by
9e-6, since CPU's channels-last BatchNorm kernel rounds more coarsely. So the 1e-5 check separates
SyncBN from per-shard statistics by orders of magnitude without flaking on rounding.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import resnetlab
from resnetlab import checkpoint as ckpt
from resnetlab.engine import resume_config

pytestmark = pytest.mark.slow  # torchrun launches

BATCH = 512  # global batch: 256 per rank with 2 ranks
STEPS_PER_EPOCH = 1258 // BATCH  # digits train split, drop_last: 2 steps
CHECKPOINT_EVERY = 1  # mid-epoch last.pt every step, so an elastic restart has one to use
DIE_AT_STEP = 2 * STEPS_PER_EPOCH  # rank 1 exits once, after the last step of epoch 2
TOL = 1e-5  # |a - b| <= TOL + TOL * |b|, for every weight and BN statistic
LAUNCH_TIMEOUT_S = 300  # a hung collective fails the test instead of the CI job

COMMON = [
    "model.name=resnet20", "model.drop_rate=0", "data.name=digits", "seed=0",
    "train.device=cpu", f"train.batch_size={BATCH}", "train.channels_last=false",
    "optim.lr=0.001", "optim.schedule=constant", "optim.warmup=none",
    "train.quiet=true", "train.tensorboard=false",
]

# Run under torchrun instead of `-m resnetlab`: rank 1 dies once at DIE_AT_STEP (a marker file
# makes it once per job, not once per restart), and every process records its rank, restart
# count and first step, so the test can see that the restart resumed mid-epoch.
WRAPPER = textwrap.dedent("""
    import os, sys
    from pathlib import Path

    import resnetlab

    marker, log, die_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    rank = int(os.environ["RANK"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    first = []

    def on_step(info):
        if not first:
            first.append(info["step"])
            with open(log, "a") as f:
                f.write(f"{rank} {restart} {info['step']}\\n")
        if rank == 1 and info["step"] == die_at and not marker.exists():
            marker.touch()
            os._exit(1)  # no cleanup, no checkpoint: as a crash or an OOM kill would

    code = resnetlab.train(None, sys.argv[4:], on_step=on_step).exit_code
    # fit() has left the process group: the threads alive now live on to the interpreter's exit
    threads = sorted((t / "comm").read_text().strip() for t in Path("/proc/self/task").iterdir())
    with open(log.with_name("threads.log"), "a") as f:
        f.write(f"{rank} {restart} {' '.join(threads)}\\n")
    sys.exit(code)
""")


def _torchrun(args: list[str], cwd: Path, *, max_restarts: int = 0) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node=2 ARGS`` (standalone: a free port, so parallel
    test runs on one machine do not collide)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--max-restarts={max_restarts}", *args]
    # torchrun keeps one TCPStore across --max-restarts rounds (pytorch#135712); the restart
    # below works without TORCH_DISABLE_SHARE_RDZV_TCP_STORE because init_from_env gives every
    # round's process group a key prefix of its own (tests/test_multinode.py has more).
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    env["OMP_NUM_THREADS"] = "1"
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish in {LAUNCH_TIMEOUT_S}s: {' '.join(cmd)}\n"
                    f"{(e.stderr or b'')[-3000:]!r}")


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    worst = max(((got[k].double() - want[k].double()).abs().max().item(), k) for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=TOL, atol=TOL,
                                   msg=lambda m, k=k: f"{k}: {m} (largest gap: {worst})")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def reference(ddp_reference: dict[int, Path], ddp_common: list[str]) -> dict[int, Path]:
    """One process with the same global batch: 1, 2 and 3 epochs (conftest's session runs)."""
    assert ddp_common == COMMON  # the runs compared with are made with these very settings
    return ddp_reference


@pytest.fixture(scope="module")
def two(root: Path) -> dict[str, object]:
    """A fresh 2-process SyncBN run of 1 epoch through the CLI."""
    proc = _torchrun(["-m", "resnetlab", "train", *COMMON, f"run.root={root / 'runs'}", "run.name=two",
                      "train.epochs=1", "train.sync_bn=true", "model.grad_checkpointing=true"], cwd=root)
    return {"proc": proc, "run_dir": root / "runs" / "two"}


@pytest.fixture(scope="module")
def elastic(root: Path, reference: dict[int, Path]) -> dict[str, object]:
    """The 1-process epoch-1 run continued to epoch 2 by 2 processes; rank 1 dies once."""
    run_dir = shutil.copytree(reference[1], root / "runs" / "elastic")
    wrapper = root / "die_once.py"
    wrapper.write_text(WRAPPER)
    marker, log = root / "rank1-died", root / "starts.log"
    overrides = [*COMMON, f"run.root={root / 'runs'}", "run.name=elastic", "train.epochs=2",
                 "train.sync_bn=true", "train.resume=auto",
                 f"train.checkpoint_every_steps={CHECKPOINT_EVERY}"]
    proc = _torchrun([str(wrapper), str(marker), str(log), str(DIE_AT_STEP), *overrides],
                     cwd=root, max_restarts=1)
    starts = [tuple(map(int, line.split())) for line in log.read_text().splitlines()] \
        if log.is_file() else []
    threads = root / "threads.log"
    after_fit = {(int(r), int(n)): names.split() for r, n, names in
                 (line.split(" ", 2) for line in threads.read_text().splitlines())} if threads.is_file() else {}
    return {"proc": proc, "marker": marker, "starts": starts, "run_dir": run_dir, "after_fit": after_fit}


def test_sync_batchnorm_conversion_keeps_the_optimisers_parameters() -> None:
    # fit() builds the optimiser before wrap_ddp converts BN for SyncBN: the converted layers
    # must hold the very Parameters (and buffers) the optimiser steps, or BN never trains.
    from resnetlab.engine.dist import convert_sync_batchnorm

    model = resnetlab.create_model("resnet20")
    params, buffers = list(model.parameters()), list(model.buffers())
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    convert_sync_batchnorm(model, torch.device("cpu"))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(type(m) is not torch.nn.BatchNorm2d for m in bns)  # all converted
    assert list(model.state_dict()) == keys  # checkpoints move between 1 and N processes
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert all(a is b for a, b in zip(model.buffers(), buffers, strict=True))
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}


SYNC_BN_RANK = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as tdist
    import torch.multiprocessing as mp

    from resnetlab.engine.dist import SyncBatchNorm2d, map_sharded

    def rank_main(rank, out, port):
        torch.set_num_threads(1)
        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        x, g = torch.load(out + ".in")  # the global batch [8, c, h, w] and the upstream gradient
        bn = SyncBatchNorm2d(x.shape[1], momentum=0.3)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
            bn.bias.uniform_(-1, 1, generator=torch.Generator().manual_seed(2))
        mine = slice(4 * rank, 4 * rank + 4)  # this rank's half of the batch
        xr = x[mine].clone().requires_grad_(True)
        y = bn(xr)
        (y * g[mine]).sum().backward()
        for p in (bn.weight, bn.bias):  # DDP sums the parameters' gradients over the ranks
            tdist.all_reduce(p.grad)
        mine_seen = []  # data.check_images' split: each rank decodes its share, all get every answer

        def check(paths):
            mine_seen.extend(paths)
            return [p.upper() for p in paths]

        answers = map_sharded(check, [f"img{i}" for i in range(7)])
        torch.save({"y": y.detach(), "dx": xr.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
                    "rm": bn.running_mean, "rv": bn.running_var, "answers": answers, "seen": mine_seen},
                   f"{out}.{rank}")
        tdist.destroy_process_group()

    if __name__ == "__main__":
        mp.start_processes(rank_main, args=(sys.argv[1], int(sys.argv[2])), nprocs=2, start_method="fork")
""")


def test_sync_batchnorm_on_two_ranks_is_batchnorm_of_the_global_batch_and_work_is_sharded(
        tmp_path: Path) -> None:
    # What torch's SyncBatchNorm computes by definition: BatchNorm2d over the global batch (forward,
    # the input's and the affine parameters' gradients, the running statistics). torch's own
    # SyncBatchNorm refuses CPU tensors, so here the reference is BatchNorm2d on the whole batch in
    # one process; benchmarks/gpu_check.py compares with torch's SyncBatchNorm on CUDA.
    # Inputs are offset (mean 3, std 2) so that E[x^2] - E[x]^2 style cancellation would show.
    # Tolerance: float32 rounding of O(1) outputs through a few operations and a sum over
    # 4 * 5 * 5 = 100 elements per channel and rank is ~1e-6; per-shard statistics differ by ~0.1.
    import socket

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 5, 5, generator=gen) * 2 + 3
    g = torch.randn(8, 3, 5, 5, generator=gen)
    out = tmp_path / "sbn"
    torch.save((x, g), f"{out}.in")
    script = tmp_path / "sbn.py"
    script.write_text(SYNC_BN_RANK)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, str(script), str(out), str(port)], capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(f"{out}.{r}") for r in (0, 1)]

    bn = torch.nn.BatchNorm2d(3, momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        bn.bias.uniform_(-1, 1, generator=torch.Generator().manual_seed(2))
    xr = x.clone().requires_grad_(True)
    y = bn(xr)
    (y * g).sum().backward()
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), **tol)
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), xr.grad, **tol)
    for r in ranks:
        torch.testing.assert_close(r["dw"], bn.weight.grad, **tol)
        torch.testing.assert_close(r["db"], bn.bias.grad, **tol)
        torch.testing.assert_close(r["rm"], bn.running_mean, **tol)
        torch.testing.assert_close(r["rv"], bn.running_var, **tol)  # unbiased, as BatchNorm2d keeps it
    # map_sharded: every rank has every answer in order; the work was split, nothing done twice
    assert all(r["answers"] == [f"IMG{i}" for i in range(7)] for r in ranks)
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == [f"img{i}" for i in range(7)]
    assert len(ranks[0]["seen"]) == 4 and len(ranks[1]["seen"]) == 3


def test_sync_batchnorm_compiles_into_one_graph() -> None:
    # torch's SyncBatchNorm breaks a compiled graph at every BN (its boolean-mask select);
    # SyncBatchNorm2d's collectives are functional ones that torch.compile traces: one graph,
    # forward and backward, the same numbers as eager. A 1-process gloo group suffices to trace.
    import socket

    import torch.distributed as tdist
    from torch._dynamo.utils import counters

    from resnetlab.engine.dist import SyncBatchNorm2d

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), SyncBatchNorm2d(8), torch.nn.ReLU(),
                                    torch.nn.Conv2d(8, 8, 3), SyncBatchNorm2d(8))
        x = torch.randn(4, 3, 12, 12)
        compiled = torch.compile(model, backend="aot_eager")
        y = compiled(x)
        y.square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        y_eager = model(x)
        y_eager.square().sum().backward()
        assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
        torch.testing.assert_close(y, y_eager)  # the same kernels, eager or traced
        for g, p in zip(grads, model.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad)
    finally:
        tdist.destroy_process_group()
        torch._dynamo.reset()


def _ok(launch: dict) -> None:
    proc = launch["proc"]
    assert proc.returncode == 0, f"torchrun exit {proc.returncode}:\n{proc.stderr[-4000:]}"


def test_two_process_syncbn_equals_one_process_with_the_same_global_batch(
        two: dict, reference: dict[int, Path]) -> None:
    _ok(two)
    _assert_same_weights(_weights(two["run_dir"]), _weights(reference[1]))


def test_rank_killed_once_restarts_from_last_checkpoint_and_completes(elastic: dict) -> None:
    _ok(elastic)
    assert elastic["marker"].exists()  # rank 1 did die
    # (rank, restart, first step): the first attempt continues the 1-process checkpoint of
    # epoch 1; after the restart both ranks continue from the last mid-epoch checkpoint before
    # the death, not from the epoch start (on_step runs before its step's save, so step
    # DIE_AT_STEP itself was never saved).
    first = STEPS_PER_EPOCH + 1
    resumed_at = (DIE_AT_STEP - 1) // CHECKPOINT_EVERY * CHECKPOINT_EVERY + 1
    assert resumed_at > first
    assert sorted(elastic["starts"]) == [(0, 0, first), (0, 1, resumed_at), (1, 0, first), (1, 1, resumed_at)]
    run = elastic["run_dir"]
    for name in ("config.yaml", "metrics.jsonl", "summary.csv", "result.json",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # one line per epoch, none repeated by the restart
    assert rows[-1]["step"] == 2 * STEPS_PER_EPOCH
    result = json.loads((run / "result.json").read_text())
    assert result["epochs"] == 2 and result["test"]["count"] > 0
    assert ckpt.load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] == 2 * STEPS_PER_EPOCH


def test_no_gloo_thread_outlives_fit(elastic: dict) -> None:
    """fit() destroys the process group it joined, and gloo's worker threads go with it.

    A group that outlives fit() (torch._dynamo imported after init_process_group keeps
    references to it; engine.dist._import_dynamo_first) keeps its threads to the interpreter's
    exit, where one still releasing the last collective's tensors aborts the finished rank with
    SIGABRT ("terminate called without an active exception"). The restarted round's two ranks
    list their threads after fit() returns; the first round's ranks did not finish.
    """
    _ok(elastic)
    assert sorted(elastic["after_fit"]) == [(0, 1), (1, 1)]
    for (rank, _), names in elastic["after_fit"].items():
        assert not [n for n in names if "gloo" in n], f"rank {rank} after fit(): {names}"


def test_checkpoints_move_between_one_and_two_processes(
        root: Path, two: dict, elastic: dict, reference: dict[int, Path]) -> None:
    # One-process checkpoint continued by two processes (the elastic run, restart included).
    _ok(elastic)
    _assert_same_weights(_weights(elastic["run_dir"]), _weights(reference[2]))

    # Two-process checkpoints continued by this one process: epoch 1 of `two`, and the
    # elastic run's epoch 2.
    _ok(two)
    for src, epochs in ((two["run_dir"], 2), (elastic["run_dir"], 3)):
        copy = shutil.copytree(src, root / "runs" / f"{src.name}-then-one")
        result = resnetlab.train(resume_config(copy, [f"train.epochs={epochs}"]))
        assert result.steps == epochs * STEPS_PER_EPOCH
        _assert_same_weights(_weights(copy), _weights(reference[epochs]))
