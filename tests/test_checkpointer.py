"""The run folder survives: a lock against a second trainer, no mixing with an earlier run,
non-finite weights and statistics never saved or loaded, config.yaml written only once a run
has started, resume rules (batch size, finished runs), stale temp files, malformed files, and
random states per rank."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import resnetlab
from resnetlab import checkpoint as ckpt
from resnetlab.config import ConfigError
from resnetlab.engine import NonFiniteLossError, TrainingError, resume_config, rng
from resnetlab.engine.checkpointer import Checkpointer
from resnetlab.engine.dist import DistInfo
from resnetlab.engine.errors import RunFolderBusyError
from resnetlab.engine.fit import build_loaders, build_training
from resnetlab.engine.state import TrainState
from resnetlab.inference import load_for_inference, read_checkpoint

STEPS_PER_EPOCH = 1258 // 128  # digits train split, batch 128, drop_last: 9


@pytest.fixture
def one_epoch(quick: list[str]) -> Path:
    """A finished 1-epoch run folder."""
    return resnetlab.train(None, [*quick, "run.name=done", "train.epochs=1"]).run_dir


def test_second_trainer_on_a_locked_run_folder_fails_at_once_naming_the_holder(one_epoch: Path) -> None:
    cfg = resume_config(one_epoch, ["train.epochs=2"])
    busy = pytest.raises(RunFolderBusyError, match=f"in use by another training process \\(pid {os.getpid()} ")
    with Checkpointer.open(cfg, DistInfo(), torch.device("cpu")), busy:  # another trainer holds it
        resnetlab.train(cfg)
    assert resnetlab.train(cfg).epochs == 2  # released: the OS drops the lock with its holder too


@pytest.mark.parametrize("leftover", ["metrics.jsonl", "config.yaml", "checkpoints/best.pt"])
def test_new_run_refuses_a_folder_holding_an_earlier_runs_files(quick: list[str], tmp_path: Path,
                                                                leftover: str) -> None:
    run = tmp_path / "runs" / "old"
    (run / "checkpoints").mkdir(parents=True)
    (run / leftover).write_text("earlier run\n")
    # the advice is a config key, which the library and the command line both take (no --flag)
    with pytest.raises(TrainingError, match=r"already holds a training run \(.+\); resume it with "
                                            r"train\.resume=auto or pick another run\.name$"):
        resnetlab.train(None, [*quick, "run.name=old", "train.epochs=1"])
    assert (run / leftover).read_text() == "earlier run\n"


def test_non_finite_batchnorm_statistics_are_never_saved(quick: list[str]) -> None:
    def poison(info):
        if info["step"] == STEPS_PER_EPOCH + 2:  # epoch 2: running_var NaN, weights finite
            bn = next(m for m in info["model"].modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("nan"))
        return False

    cfg = resnetlab.load_config(None, [*quick, "run.name=nanbn", "train.epochs=2"])
    run = Path(cfg.run.root) / "nanbn"
    with pytest.raises(NonFiniteLossError):
        resnetlab.train(cfg, on_step=poison)
    saved = ckpt.load_checkpoint(run / "checkpoints" / "last.pt")
    assert saved["state"]["epoch"] == 1  # epoch 1's checkpoint, untouched
    assert not ckpt.non_finite(saved["model"])


def test_non_finite_weights_are_refused_on_load_naming_the_file(one_epoch: Path, tmp_path: Path) -> None:
    obj = ckpt.load_checkpoint(one_epoch / "checkpoints" / "last.pt")
    key = next(k for k in obj["model"] if k.endswith("running_var"))
    obj["model"][key][0] = float("inf")
    bad = tmp_path / "bad.pt"
    torch.save(obj, bad)
    with pytest.raises(ckpt.CheckpointError, match=f"{bad}: holds non-finite values .*{key}"):
        load_for_inference(bad)


def test_failed_resume_leaves_config_yaml_as_it_was(one_epoch: Path, quick: list[str]) -> None:
    # train.resume=auto reaches the checkpoint without resume_config: the checkpoint's own config
    # refuses the changed network before anything is written
    before = (one_epoch / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match="model.name cannot change when resuming .*run's value: resnet20"):
        resnetlab.train(None, [*quick, "run.name=done", "train.resume=auto", "train.epochs=2",
                               "model.name=resnet32"])
    assert (one_epoch / "config.yaml").read_bytes() == before


def test_resume_with_another_batch_size_is_refused(quick: list[str]) -> None:
    # the batch size defines the run (the schedule and the batches drawn): never changed on resume
    first = resnetlab.train(None, [*quick, "run.name=mid", "train.epochs=2"],
                            on_step=lambda info: info["step"] == 3)
    assert first.interrupted == "stop"
    with pytest.raises(ConfigError, match="train.batch_size cannot change when resuming .*run's value: 128"):
        resnetlab.train(resume_config(first.run_dir, ["train.batch_size=64"]))
    with pytest.raises(ConfigError, match="train.batch_size cannot change"):  # nor via train.resume=auto
        resnetlab.train(None, [*quick, "run.name=mid", "train.resume=auto", "train.batch_size=64"])
    assert ckpt.load_checkpoint(first.run_dir / "checkpoints" / "last.pt")["state"]["step"] == 3


def test_resuming_a_finished_run_keeps_result_json(one_epoch: Path) -> None:
    before = (one_epoch / "result.json").read_bytes()
    assert json.loads(before)["val"]  # the finished run validated
    result = resnetlab.train(resume_config(one_epoch))
    assert (one_epoch / "result.json").read_bytes() == before
    assert result.val == json.loads(before)["val"] and result.epochs == 1


def test_stale_temp_files_of_a_killed_save_are_removed_on_resume(one_epoch: Path) -> None:
    stale = [one_epoch / "checkpoints" / ".last.pt.abc123.tmp", one_epoch / ".result.json.x.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    keep = one_epoch / "checkpoints" / "notes.tmp"  # not one of ours: left alone
    keep.write_text("mine")
    resnetlab.train(resume_config(one_epoch, ["train.epochs=2"]))
    assert not any(p.exists() for p in stale) and keep.exists()


def test_malformed_checkpoints_are_refused_naming_the_file(one_epoch: Path, tmp_path: Path) -> None:
    obj = ckpt.load_checkpoint(one_epoch / "checkpoints" / "last.pt")
    not_a_mapping = tmp_path / "list.pt"
    torch.save({**obj, "model": [1, 2, 3], "ema": None}, not_a_mapping)
    with pytest.raises(ckpt.CheckpointError, match=f"{not_a_mapping}: its 'model' entry should map"):
        read_checkpoint(not_a_mapping)
    wrong_dtype = tmp_path / "dtype.pt"
    model = dict(obj["model"])
    key = next(k for k in model if k.endswith("conv1.weight"))
    model[key] = model[key].view(torch.int32)  # same bytes and shape, read as integers
    torch.save({**obj, "model": model}, wrong_dtype)
    with pytest.raises(ckpt.CheckpointError, match=f"{wrong_dtype}: wrong tensor dtype: {key}"):
        load_for_inference(wrong_dtype)
    no_state = tmp_path / "nostate.pt"
    torch.save({k: v for k, v in obj.items() if k != "optimizer"}, no_state)
    cfg = resume_config(one_epoch, ["train.epochs=2"])
    cpu = torch.device("cpu")
    parts, _ = build_training(cfg, build_loaders(cfg, DistInfo(), cpu), cpu)
    with Checkpointer.open(cfg, DistInfo(), cpu) as c, \
            pytest.raises(ckpt.CheckpointError, match=f"{no_state}: not a training checkpoint"):
        c.restore(no_state, parts, TrainState(), cfg)


def test_safetensors_with_an_edited_dtype_or_deep_header_is_refused(one_epoch: Path, tmp_path: Path) -> None:
    from resnetlab.export import export_model

    out = export_model(one_epoch, "safetensors", tmp_path / "m.safetensors").path
    blob = bytearray(out.read_bytes())
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    key = next(k for k in header if k.endswith("conv1.weight"))
    assert header[key]["dtype"] == "F32"
    header[key]["dtype"] = "I32"  # same size per element: the file still parses
    edited = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(edited) == n
    (tmp_path / "dtype.safetensors").write_bytes(bytes(blob[:8]) + edited + bytes(blob[8 + n:]))
    with pytest.raises(ckpt.CheckpointError, match="wrong tensor dtype"):
        load_for_inference(tmp_path / "dtype.safetensors")
    header[key]["dtype"] = "F32"
    header["__metadata__"]["resnetlab.config"] = "[" * 100_000 + "]" * 100_000
    deep = json.dumps(header).encode()
    (tmp_path / "deep.safetensors").write_bytes(len(deep).to_bytes(8, "little") + deep + bytes(blob[8 + n:]))
    with pytest.raises(ckpt.CheckpointError, match="deep.safetensors"):
        load_for_inference(tmp_path / "deep.safetensors")


def test_random_states_are_saved_per_rank_and_restored_across_world_sizes() -> None:
    states = [{"python": r} for r in range(2)]
    packed = rng.pack_rng(states)
    assert rng.unpack_rng(packed, 1, 2) == (states[1], None)  # same world: own state
    own, note = rng.unpack_rng(packed, 0, 1)  # fewer ranks: rank 0 keeps its own
    assert own == states[0] and "saved by 2 process(es), resumed by 1" in note
    own, note = rng.unpack_rng(packed, 3, 4)  # more ranks: new ones are re-seeded
    assert own is None and "ranks 2..3 get fresh random states" in note
    legacy = {"python": "rank 0"}
    assert rng.unpack_rng(legacy, 1, 2) == (legacy, None)
    assert "cuda" not in rng.rng_state(torch.device("cpu"))  # never every visible GPU's states


def test_old_checkpoint_with_eight_gpu_states_restores_on_one_gpu(monkeypatch) -> None:
    # Rank 0 of an 8-GPU run used to save get_rng_state_all(); set_rng_state_all on a 1-GPU
    # machine raised IndexError. Now a device takes its own index's entry only.
    state = rng.rng_state(None)
    state["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    calls = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: calls.append((int(s[0]), device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                        lambda states: (_ for _ in ()).throw(IndexError("list index out of range")))
    rng.set_rng_state(state, torch.device("cuda", 0))
    rng.set_rng_state(state, torch.device("cuda", 3))
    assert calls == [(0, torch.device("cuda", 0)), (3, torch.device("cuda", 3))]
    calls.clear()
    rng.set_rng_state({**state, "cuda": state["cuda"][:1]}, torch.device("cuda", 5))  # no entry 5
    assert calls == []  # left as seeded
