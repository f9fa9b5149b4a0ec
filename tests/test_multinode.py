"""Several machines, shown on one: two torchrun agents on 127.0.0.1 as two "nodes".

Every launch is ``torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d
--rdzv-endpoint=127.0.0.1:PORT`` per node, with torchrun's own rendezvous and its shared TCPStore
left on (no ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE``): the restarts below are what pytorch#135712
broke and ``dist._round_store`` fixes.

- two agents with SyncBN end where one process with the same global batch ends, through three
  worker deaths in a row on alternating nodes under ``--max-restarts=3``;
- a node dies mid-run (its worker kills its agent, then itself); under ``--nnodes=1:2`` and
  ``--max-restarts=1`` the other node resumes alone from the last checkpoint and finishes where
  an uninterrupted run does;
- ``examples/slurm/train.sbatch`` run as written with ``srun``/``scontrol`` stand-ins: its
  torchrun line starts the two agents, the USR1 it asks Slurm for reaches the workers' SIGTERM
  handling (save and stop), it requeues, and the requeued job finishes.

Tolerances and the small learning rate are those of ``tests/test_distributed.py`` (its
docstring measures them): two SyncBN processes stay within 1e-6 of one process after a few
steps of lr 0.001 in NCHW, so 1e-5 separates exact-up-to-rounding from any real difference.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import resnetlab
from resnetlab import checkpoint as ckpt
from resnetlab.engine import dist

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "examples" / "slurm" / "train.sbatch"
BATCH = 512  # global: 256 per node
STEPS_PER_EPOCH = 1258 // BATCH  # digits train split, drop_last: 2 steps
TOL = 1e-5
TIMEOUT_S = 300  # per launch: a hung rendezvous or collective fails the test, not the CI job

COMMON = [
    "model.name=resnet20", "model.drop_rate=0", "data.name=digits", "seed=0",
    "train.device=cpu", f"train.batch_size={BATCH}", "train.channels_last=false",
    "optim.lr=0.001", "optim.schedule=constant", "optim.warmup=none",
    "train.quiet=true", "train.tensorboard=false",
]

# The worker under torchrun: `-m resnetlab train` plus a hook that records (node, rank, restart
# count, first step) per process start and dies as told, each death once per job (marker files).
WORKER = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path

    import resnetlab

    node = os.environ["TEST_NODE"]
    log, deaths = Path(os.environ["TEST_LOG"]), json.loads(os.environ.get("TEST_DEATHS", "[]"))
    rank = int(os.environ["RANK"])
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    first = []

    def on_step(info):
        if not first:
            first.append(info["step"])
            with open(log, "a") as f:
                f.write(f"{node} {rank} {restart} {info['step']}\\n")
        for i, (where, step, how) in enumerate(deaths):
            marker = log.with_name(f"death{i}")
            if where == node and info["step"] == step and not marker.exists():
                marker.touch()
                if how == "node":  # the whole machine: its agent first, then this worker
                    os.kill(os.getppid(), signal.SIGKILL)
                os._exit(1)  # no cleanup, no checkpoint: a crash

    sys.exit(resnetlab.train(None, sys.argv[1:], on_step=on_step).exit_code)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


class Agents:
    """torchrun agents of one job on loopback, output to files, killed at teardown."""

    def __init__(self, root: Path, *, max_restarts: int, deaths: list | None = None,
                 nnodes: str = "2", rdzv_conf: str = "") -> None:
        self.root, self.max_restarts, self.nnodes, self.rdzv_conf = root, max_restarts, nnodes, rdzv_conf
        self.port, self.job = free_port(), f"job{free_port()}"
        self.script = root / "worker.py"
        self.script.write_text(WORKER)
        self.log = root / "starts.log"
        self.deaths = json.dumps(deaths or [])
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, node: str, overrides: list[str]) -> subprocess.Popen:
        # The first agent hosts the rendezvous store (is_host=1): on loopback every agent's host
        # name matches the endpoint, and the tests must know which node they may kill.
        conf = ",".join(filter(None, [f"is_host={int(not self.procs)}", self.rdzv_conf]))
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={self.nnodes}",
               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{self.port}",
               f"--rdzv-id={self.job}", f"--rdzv-conf={conf}", f"--max-restarts={self.max_restarts}",
               str(self.script), *overrides]
        out = open(self.root / f"agent-{node}.log", "w")  # noqa: SIM115 (closed by the process end)
        proc = subprocess.Popen(cmd, cwd=self.root, stdout=out, stderr=subprocess.STDOUT,
                                env=_env(TEST_NODE=node, TEST_LOG=str(self.log), TEST_DEATHS=self.deaths))
        self.procs[node] = proc
        return proc

    def wait(self, node: str) -> int:
        try:
            return self.procs[node].wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"agent {node} did not finish in {TIMEOUT_S}s\n{self.output()}")

    def kill(self) -> None:
        for p in self.procs.values():
            _stop(p)

    def output(self) -> str:
        return "\n".join(f"--- agent {n}:\n{(self.root / f'agent-{n}.log').read_text()[-3000:]}"
                         for n in self.procs)

    def starts(self) -> list[tuple[str, int, int, int]]:
        """(node, rank, restart count, first step) of every worker process that trained."""
        if not self.log.is_file():
            return []
        return [(n, int(r), int(c), int(s)) for n, r, c, s in
                (line.split() for line in self.log.read_text().splitlines())]


def _stop(proc: subprocess.Popen, group: bool = False) -> None:
    """End a launch that is still running: SIGTERM first, so that torchrun stops its workers
    (they run in sessions of their own), then SIGKILL."""
    if proc.poll() is not None:
        return
    send = (lambda sig: os.killpg(proc.pid, sig)) if group else proc.send_signal
    send(signal.SIGTERM)
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait()


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    worst = max(((got[k].double() - want[k].double()).abs().max().item(), k) for k in want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=TOL, atol=TOL,
                                   msg=lambda m, k=k: f"{k}: {m} (largest gap: {worst})")


def _metrics_epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("multinode")


@pytest.fixture(scope="module")
def reference(ddp_reference: dict[int, Path], ddp_common: list[str]) -> dict[int, Path]:
    """One process with the same global batch: 1, 2 and 3 epochs (conftest's session runs)."""
    assert ddp_common == COMMON  # the runs compared with are made with these very settings
    return ddp_reference


# ----------------------------------------------------------------------------------------------
# the restart round handshake, in one process (threads stand in for ranks)


def _agree(store: torch.distributed.Store, world: int) -> list[int]:
    got: list[int] = [0] * world
    timeout = datetime.timedelta(seconds=30)

    def one(rank: int) -> None:
        got[rank] = dist._agree_round(store, rank, world, timeout, poll_s=0.001)

    threads = [threading.Thread(target=one, args=(r,)) for r in reversed(range(world))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return got


def test_restart_rounds_agree_on_a_fresh_number_despite_a_dead_rounds_keys() -> None:
    store = torch.distributed.HashStore()
    store.set_timeout(datetime.timedelta(seconds=30))
    assert _agree(store, 3) == [1, 1, 1]
    # A round that died half way: rank 0 drew 2 and answered nobody; rank 2 posted a token that
    # was never answered; rank 1's old token was answered but never read.
    assert store.add("resnetlab/rounds", 1) == 2
    store.set("resnetlab/hello/2", "dead-token")
    store.set("resnetlab/hello/1", "old-token")
    store.set("resnetlab/answer/old-token", "2")
    assert _agree(store, 3) == [3, 3, 3]
    assert _agree(store, 2) == [4, 4]  # a smaller world after an elastic shrink

    # A rank 0 left waiting by a dead round stops answering once a newer round has drawn its
    # number, so its stale number cannot reach the new round's ranks.
    errors: list[BaseException] = []

    def orphan() -> None:
        try:
            dist._agree_round(store, 0, 2, datetime.timedelta(seconds=30), poll_s=0.001)
        except RuntimeError as e:
            errors.append(e)

    t = threading.Thread(target=orphan)
    t.start()
    time.sleep(0.1)
    store.add("resnetlab/rounds", 1)  # the new round's rank 0
    t.join(timeout=30)
    assert not t.is_alive() and "superseded" in str(errors[0])


# ----------------------------------------------------------------------------------------------
# two agents on loopback


@pytest.mark.slow
def test_node_dies_mid_run_the_other_resumes_and_ends_as_uninterrupted(
        root: Path, reference: dict[int, Path]) -> None:
    # Elastic --nnodes=1:2 (last_call_timeout: how long a rendezvous with fewer than 2 nodes
    # waits for more; both agents start together, well within it). When node b dies (its agent and worker killed at once), node a's
    # worker loses its peer, a restarts it (--max-restarts=1), the rendezvous closes with the one
    # node left, and the run continues alone from the last checkpoint: one process with the same
    # global batch, so it must end where the uninterrupted one-process run ends.
    work = root / "node-dies"
    work.mkdir()
    die_at = 2 * STEPS_PER_EPOCH  # the last step of epoch 2; last.pt holds the step before it
    agents = Agents(work, max_restarts=1, deaths=[["b", die_at, "node"]], nnodes="1:2",
                    rdzv_conf="last_call_timeout=10")
    overrides = [*COMMON, f"run.root={work / 'runs'}", "run.name=elastic", "train.epochs=2",
                 "train.sync_bn=true", "train.resume=auto", "train.checkpoint_every_steps=1"]
    try:
        agents.start("a", overrides)
        agents.start("b", overrides)
        codes = [agents.wait("a"), agents.wait("b")]
    finally:
        agents.kill()
    assert codes == [0, -signal.SIGKILL], agents.output()
    starts = agents.starts()
    assert sorted((n, c, s) for n, _, c, s in starts) == [("a", 0, 1), ("a", 1, die_at), ("b", 0, 1)], starts
    run = work / "runs" / "elastic"
    assert _metrics_epochs(run) == [1, 2]
    _assert_same_weights(_weights(run), _weights(reference[2]))


@pytest.mark.slow
def test_three_restarts_in_a_row(root: Path, reference: dict[int, Path]) -> None:
    # Also the plain two-agent case: two agents with SyncBN, each round of them, end where one
    # process with the same global batch ends (a separate uninterrupted two-agent launch added
    # nothing this one does not check).
    work = root / "three"
    work.mkdir()
    # A worker dies at steps 2, 3 and 4, alternating nodes; each restart resumes from the step
    # before its death (a checkpoint every step). The agents' restart counts drift apart (a node
    # whose own worker did not fail restarts without counting), which the round handshake
    # absorbs. 4 steps in all: the tolerance holds for that many (after 6, rounding alone
    # reached 2e-5 here).
    deaths = [["b", 2, "worker"], ["a", 3, "worker"], ["b", 4, "worker"]]
    agents = Agents(work, max_restarts=3, deaths=deaths)
    overrides = [*COMMON, f"run.root={work / 'runs'}", "run.name=three", "train.epochs=2",
                 "train.sync_bn=true", "train.resume=auto", "train.checkpoint_every_steps=1"]
    try:
        agents.start("a", overrides)
        agents.start("b", overrides)
        codes = [agents.wait("a"), agents.wait("b")]
    finally:
        agents.kill()
    assert codes == [0, 0], agents.output()
    assert all(work.joinpath(f"death{i}").exists() for i in range(3))
    firsts = sorted({s for _, _, _, s in agents.starts()})
    assert firsts == [1, 2, 3, 4], agents.starts()
    for first in firsts:  # every round: both agents, one rank each (two agents with SyncBN)
        round_ = sorted((n, r) for n, r, _, s in agents.starts() if s == first)
        assert round_ in ([("a", 0), ("b", 1)], [("a", 1), ("b", 0)]), agents.starts()
    run = work / "runs" / "three"
    assert _metrics_epochs(run) == [1, 2]
    _assert_same_weights(_weights(run), _weights(reference[2]))


# ----------------------------------------------------------------------------------------------
# the Slurm recipe

SRUN_STUB = textwrap.dedent("""\
    #!/bin/bash
    # srun stand-in: one task per "node" ($STUB_NODES of them) on this machine, SIGTERM forwarded
    # to every task as srun does.
    while [[ "$1" == -* ]]; do shift; done  # srun's own options
    pids=()
    for ((i = 0; i < STUB_NODES; i++)); do
        SLURM_NODEID=$i SLURM_PROCID=$i "$@" &
        pids+=($!)
        sleep 2  # node 0 binds the rendezvous port first, as the first node of a job would
    done
    trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
    status=0
    for p in "${pids[@]}"; do
        while :; do
            wait "$p"; s=$?
            kill -0 "$p" 2>/dev/null || break
        done
        [ "$s" -ne 0 ] && status=$s
    done
    exit $status
""")

SCONTROL_STUB = textwrap.dedent("""\
    #!/bin/bash
    # scontrol stand-in: `show hostnames` prints $STUB_HOSTS one a line, `requeue` is recorded.
    case "$1 $2" in
        "show hostnames") tr ',' '\\n' <<< "$STUB_HOSTS" ;;
        requeue*) echo "$2" >> "$STUB_REQUEUED" ;;
        *) echo "unexpected: scontrol $*" >&2; exit 2 ;;
    esac
""")


def _sbatch_directives(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if m:
            found[m.group(1)] = m.group(2) or ""
    return found


def _torchrun_line(text: str) -> list[str]:
    """The srun command of the script, continuation lines joined, as words."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [ln.strip() for ln in joined.splitlines() if re.match(r"\s*srun\b", ln)]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].rstrip("&").strip())


def test_sbatch_file_asks_for_one_agent_per_node_and_a_requeue_signal() -> None:
    text = SBATCH.read_text()
    d = _sbatch_directives(text)
    assert d["ntasks-per-node"] == "1"  # one torchrun agent per node; it starts the GPUs' workers
    assert int(d["cpus-per-task"]) > 0 and int(d["nodes"]) >= 2
    assert "requeue" in d and re.fullmatch(r"B:USR1@\d+", d["signal"])
    words = _torchrun_line(text)
    assert words[0] == "srun" and "torchrun" in words
    srun_options = words[1:words.index("torchrun")]
    assert any(w.startswith("--cpus-per-task=") for w in srun_options)  # srun does not inherit it
    flags = " ".join(words)
    for flag in ("--nnodes=", "--nproc-per-node=", "--rdzv-backend=c10d", "--rdzv-endpoint=",
                 "--rdzv-id=", "--max-restarts=", "train.resume=auto"):
        assert flag in flags, flag
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in text
    assert re.search(r"scontrol show hostnames", text) and "trap" in text


@pytest.mark.slow
def test_sbatch_runs_on_loopback_saves_on_the_signal_and_the_requeued_job_finishes(
        root: Path, reference: dict[int, Path]) -> None:
    work = root / "slurm"
    stubs = work / "bin"
    stubs.mkdir(parents=True)
    for name, body in (("srun", SRUN_STUB), ("scontrol", SCONTROL_STUB)):
        (stubs / name).write_text(body)
        (stubs / name).chmod(0o755)
    # torchrun itself: this venv's, through a wrapper, as `torchrun` would be on a cluster PATH
    (stubs / "torchrun").write_text(f'#!/bin/bash\nexec {shlex.quote(sys.executable)} -m torch.distributed.run "$@"\n')
    (stubs / "torchrun").chmod(0o755)
    requeued = work / "requeued"
    env = _env(PATH=f"{stubs}:{os.environ['PATH']}", STUB_NODES="2", STUB_HOSTS="127.0.0.1",
               STUB_REQUEUED=str(requeued), SLURM_JOB_ID="4242", SLURM_JOB_NAME="resnetlab",
               SLURM_JOB_NODELIST="127.0.0.1", SLURM_NNODES="2", SLURM_CPUS_PER_TASK="2",
               GPUS_PER_NODE="1", RECIPE="", RDZV_PORT=str(free_port()), RUN_ROOT=str(work / "runs"))
    overrides = [*COMMON, "train.epochs=2", "train.sync_bn=true", "train.checkpoint_every_steps=1"]
    run = work / "runs" / "resnetlab-4242"

    def sbatch() -> subprocess.Popen:
        out = open(work / "job.log", "a")  # noqa: SIM115
        return subprocess.Popen(["bash", str(SBATCH), *overrides], cwd=work, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def log() -> str:
        return (work / "job.log").read_text()[-4000:]

    job = sbatch()
    try:
        # Slurm's warning before the time limit, once step 1 is saved (3 steps to go): the script
        # forwards SIGTERM, the workers finish their step, save and stop, then it requeues.
        deadline = time.monotonic() + TIMEOUT_S
        while not (run / "checkpoints" / "last.pt").is_file() and job.poll() is None:
            assert time.monotonic() < deadline, log()
            time.sleep(0.05)
        job.send_signal(signal.SIGUSR1)
        code = job.wait(timeout=TIMEOUT_S)
    finally:
        _stop(job, group=True)
    assert requeued.read_text().split() == ["4242"], log()
    assert code == 0, log()
    stopped_at = ckpt.load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"]
    assert 1 <= stopped_at < 2 * STEPS_PER_EPOCH, log()
    assert not (run / "result.json").is_file()  # it stopped early

    job = sbatch()  # the requeued job: the same script, the same arguments
    try:
        code = job.wait(timeout=TIMEOUT_S)
    finally:
        _stop(job, group=True)
    assert code == 0, log()
    assert requeued.read_text().split() == ["4242"]  # no second requeue
    assert _metrics_epochs(run) == [1, 2]
    assert json.loads((run / "result.json").read_text())["epochs"] == 2
    _assert_same_weights(_weights(run), _weights(reference[2]))


def test_sbatch_is_valid_bash() -> None:
    assert shutil.which("bash")
    proc = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------------------------
# the scaling model (benchmarks/scale_model.py): what its formula must give in the limits


def test_scaling_model_limits() -> None:
    from benchmarks import scale_model as sm

    model = resnetlab.create_model("resnet20")
    nbytes = sm.grad_bytes(model)
    assert nbytes == 4 * sum(p.numel() for p in model.parameters())
    # one worker alone communicates nothing; two single-GPU nodes send B over the link
    assert sm.allreduce_seconds(nbytes, 1, 1, node_gbit=100) == 0
    two = sm.allreduce_seconds(nbytes, 2, 1, node_gbit=8, alpha_s=0.0)  # 8 Gb/s = 1 GB/s
    assert two == pytest.approx(nbytes / 1e9)
    # the inter-node term tends to 2 B / W_node as nodes grow; the latency term grows linearly
    far = sm.allreduce_seconds(nbytes, 1000, 1, node_gbit=8, alpha_s=0.0)
    assert far == pytest.approx(2 * 999 / 1000 * nbytes / 1e9)
    rows = sm.table(step_s=0.05, nbytes=100 * 2**20, node_gbit=100)
    assert [r["nodes"] for r in rows] == list(sm.NODES)
    lo = [r["efficiency_no_overlap"] for r in rows]
    hi = [r["efficiency_overlap"] for r in rows]
    assert all(0 < a <= b <= 1 for a, b in zip(lo, hi, strict=True))
    assert lo == sorted(lo, reverse=True)  # more nodes never scale better per GPU
    assert sm.efficiency(1.0, 0.5, overlap=2 / 3) == 1.0  # fully hidden behind the backward pass
