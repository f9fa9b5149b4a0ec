"""A run folder you can trust: resume never changes what a run is, a diverged checkpoint never
passes for a good one, names and paths stay where they belong, and OS errors are one true line.

Every refusal here leaves the run folder as it was (its files compared byte for byte).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import resnetlab
from resnetlab import checkpoint as ckpt
from resnetlab.cli import main
from resnetlab.config import BOUNDS, ConfigError, DataConfig, load
from resnetlab.data import DataError, build_datasets
from resnetlab.engine import NonFiniteLossError, resume_config
from resnetlab.inference import NonFiniteOutputError, load_for_inference

QUICK = ["train.quiet=true", "train.tensorboard=false", "train.batch_size=128", "optim.schedule=constant",
         "optim.warmup=none"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch digits run (about two seconds); tests copy it before changing it."""
    root = tmp_path_factory.mktemp("trust")
    return resnetlab.train(None, [*QUICK, f"run.root={root}", "run.name=done", "train.epochs=1"]).run_dir


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    """A private copy of the finished run."""
    return Path(shutil.copytree(finished, tmp_path / "runs" / "done"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def _strict_json(text: str) -> object:
    def refuse(word: str) -> object:
        raise AssertionError(f"{word} is not JSON")

    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize(("override", "key", "shown"), [
    ("seed=5", "seed", "0"),
    ("data.test_fraction=0.5", "data.test_fraction", "0.2"),
    ("data.val_fraction=0.3", "data.val_fraction", "0.1"),
    ("model.name=resnet32", "model.name", "resnet20"),
    ("model.drop_rate=0.5", "model.drop_rate", "0.0"),
    ("train.batch_size=64", "train.batch_size", "128"),
])
def test_resume_refuses_keys_that_define_the_run(run: Path, override: str, key: str, shown: str) -> None:
    before = _snapshot(run)
    code, _, err = _cli(["train", "--resume", str(run), override, "train.epochs=2"])
    assert code == 2
    assert err.count("\n") == 1 and f"{key} cannot change when resuming {run}" in err
    assert f"the run's value: {shown})" in err
    assert _snapshot(run) == before


def test_resume_records_the_keys_it_may_change_in_the_history(run: Path) -> None:
    result = resnetlab.train(resume_config(run, ["train.epochs=2", "data.num_workers=0", "train.eval_every=2"]))
    assert result.epochs == 2
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert rows[0]["resumed"] is True  # so train.resume (auto on every resume) is not listed as a change
    assert rows[0]["changed"] == {"train.epochs": [1, 2], "data.num_workers": [2, 0], "train.eval_every": [1, 2]}


def test_resume_refuses_fewer_epochs_than_begun(tmp_path: Path) -> None:
    # stopped mid-epoch 2 of 2: one epoch done, the second begun
    first = resnetlab.train(None, [*QUICK, f"run.root={tmp_path}", "run.name=mid", "train.epochs=2"],
                            on_step=lambda info: info["step"] == 9 + 3)
    assert first.interrupted == "stop"
    before = _snapshot(first.run_dir)
    code, _, err = _cli(["train", "--resume", str(first.run_dir), "train.epochs=1"])
    assert code == 2 and err.count("\n") == 1
    assert "train.epochs=1 is fewer than the 2 epoch(s)" in err and "train.epochs=2 or more" in err
    assert _snapshot(first.run_dir) == before


@pytest.mark.parametrize("args", [["-c", "cifar10_resnet56"], ["run.name=other"], ["run.root=/elsewhere"]])
def test_resume_refuses_another_recipe_or_run_name(run: Path, args: list[str]) -> None:
    before = _snapshot(run)
    code, _, err = _cli(["train", "--resume", str(run), *args])
    assert code == 2 and err.count("\n") == 1
    assert ("-c cifar10_resnet56 does not combine with --resume" in err if args[0] == "-c"
            else f"{args[0].split('=')[0]} cannot change when resuming" in err)
    assert _snapshot(run) == before
    assert not (run.parent / "other").exists()


# ---------------------------------------------------------------------------------------------- divergence


@pytest.fixture
def diverged(run: Path) -> Path:
    """The run with every weight scaled by 1e29: finite tensors, non-finite outputs."""
    path = run / "checkpoints" / "last.pt"
    obj = ckpt.load_checkpoint(path)
    obj["model"] = {k: v * 1e29 if v.is_floating_point() and k.endswith("weight") else v
                    for k, v in obj["model"].items()}
    assert not ckpt.non_finite(obj["model"])
    torch.save(obj, path)
    (run / "checkpoints" / "best.pt").unlink(missing_ok=True)
    return run


def test_training_never_keeps_a_checkpoint_whose_forward_is_not_finite(tmp_path: Path) -> None:
    cfg = load(None, [*QUICK, f"run.root={tmp_path}", "run.name=div", "optim.lr=1e30",
                      "train.checkpoint_every_steps=1", "train.epochs=1"])
    with pytest.raises(NonFiniteLossError, match="not usable: its forward pass gives .* non-finite logit"):
        resnetlab.train(cfg)
    for kept in (tmp_path / "div" / "checkpoints").glob("*.pt"):  # what was kept is good
        load_for_inference(kept)


def test_eval_and_predict_refuse_a_diverged_checkpoint(diverged: Path, tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(image)
    for args in (["eval", str(diverged)], ["predict", str(diverged), str(image)]):
        code, out, err = _cli(args)
        assert code == 2 and out == "" and err.count("\n") == 1, (args, err)
        assert "non-finite logit" in err and "checkpoints/last.pt" in err
        code, out, err = _cli([*args, "--json"])
        assert code == 2 and err.count("\n") == 1
        doc = _strict_json(out)
        assert isinstance(doc, dict) and "non-finite logit" in doc["error"]
        assert doc.get("metrics", doc.get("predictions", 0)) is None
    assert not (diverged / "eval-val.json").exists()


def test_predict_json_never_holds_nan_for_an_image_whose_output_is_not_finite(run: Path, tmp_path: Path,
                                                                              monkeypatch) -> None:
    from resnetlab.serve.backends import TorchBackend

    real, calls = TorchBackend.predict_batch, []

    def nan_for_the_second(self, x):  # the torch loader's start-up check does not come through here
        probs = real(self, x)
        calls.append(len(x))
        probs[1:] = float("nan")
        return probs

    monkeypatch.setattr(TorchBackend, "predict_batch", nan_for_the_second)
    for i in range(2):
        Image.fromarray(np.full((8, 8), 50 * i, np.uint8)).save(tmp_path / f"{i}.png")
    code, out, _ = _cli(["predict", str(run), str(tmp_path / "0.png"), str(tmp_path / "1.png"), "--json"])
    doc = _strict_json(out)
    assert calls == [2]  # one batch of both images; the finite check at load ran once, in the loader
    assert code == 1 and isinstance(doc, dict)
    assert [p["file"] for p in doc["predictions"]] == [str(tmp_path / "0.png")]
    assert doc["errors"][0]["file"] == str(tmp_path / "1.png") and "not finite" in doc["errors"][0]["error"]


def test_serve_refuses_a_diverged_checkpoint_at_start_up(diverged: Path) -> None:
    from resnetlab.serve import load_served_model

    with pytest.raises(NonFiniteOutputError, match="non-finite logit"):
        load_served_model(diverged)
    code, out, err = _cli(["serve", str(diverged), "--port", "8765"])
    assert code == 2 and "serving" not in out and err.count("\n") == 1 and "non-finite logit" in err


# ---------------------------------------------------------------------------------------------- names, paths


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", ".", "-rf", "x" * 256])
def test_run_names_are_one_path_component(tmp_path: Path, name: str) -> None:
    code, _, err = _cli(["train", f"run.root={tmp_path / 'runs'}", f"run.name={name}", *QUICK])
    assert code == 2 and err.count("\n") == 1 and "run.name=" in err
    assert list(tmp_path.iterdir()) == []  # nothing written, inside run.root or out of it
    with pytest.raises(ConfigError, match="NUL"):
        load(None, {"run.name": "a\0b"})


@pytest.mark.parametrize(("text", "value"), [
    ("0x10", "0x10"), ("007", "007"), ("1_000", "1_000"), ("+1", "+1"), (".inf", ".inf"), ("~", "~"),
    ("true", "true"), ("yes", "yes"), ("on", "on"), ("2024-01-01", "2024-01-01"), ("'null'", "null"),
    ("null", None), ("", None),
])
def test_string_fields_take_the_command_line_text_literally(text: str, value: str | None) -> None:
    assert load(None, [f"run.name={text}"]).run.name == value
    assert load(None, [f"train.device={text or 'cpu'}"]).train.device == (text or "cpu").strip("'")
    assert load(None, [f"data.classes=[{text or 'a'},b]"]).data.classes == (value or text or "a", "b")


@pytest.mark.parametrize("key", sorted(BOUNDS))
def test_values_above_their_sane_bound_are_refused_naming_it(key: str) -> None:
    bound = BOUNDS[key][0]
    extra = ["data.resize=20000"] if key == "data.image_size" else []  # resize >= image_size
    with pytest.raises(ConfigError, match=f"^{key}={bound + 1} is above its bound of {bound:,}"):
        load(None, [*extra, f"{key}={bound + 1}"])
    if key != "data.image_size":
        load(None, [f"{key}={bound}"] + (["data.image_size=224"] if key == "data.resize" else []))


def test_export_force_never_overwrites_the_runs_own_files(run: Path) -> None:
    before = _snapshot(run)
    for name in ("config.yaml", "metrics.jsonl", "result.json", "checkpoints/last.pt"):
        code, _, err = _cli(["export", str(run), "--format", "onnx", "--output", str(run / name), "--force"])
        assert code == 2 and err.count("\n") == 1 and "never overwritten" in err, err
    assert _snapshot(run) == before


def test_a_corrupt_config_yaml_is_one_line(run: Path) -> None:
    (run / "config.yaml").write_bytes(b"\x08\x07\x12\x04onnx\xff\xfe\x00")
    code, _, err = _cli(["train", "--resume", str(run), "train.epochs=2"])
    assert code == 2 and err.count("\n") == 1 and "config.yaml: not a YAML text file" in err


def _image_folder(root: Path, splits: tuple[str, ...] = ("train",), per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for split in splits:
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("link", ["test", "val"])
def test_a_split_linked_to_another_split_is_refused(tmp_path: Path, link: str) -> None:
    root = _image_folder(tmp_path / "data")
    (root / link).symlink_to(root / "train")
    with pytest.raises(DataError, match=f"split folder {root / link} is a link to {root / 'train'}"):
        build_datasets(DataConfig(name="folder", root=str(root), image_size=8, resize=8), seed=0)


# ---------------------------------------------------------------------------------------------- OS errors


_CHILD = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from resnetlab.cli import main
sys.exit(main(["train", "--resume", sys.argv[2], "train.epochs=2", "train.checkpoint_every_steps=1"]))
"""


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(run: Path) -> None:
    last = run / "checkpoints" / "last.pt"
    before = last.read_bytes()
    limit = len(before) // 2  # the new last.pt cannot be written; config.yaml and metrics can
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(limit), str(run)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if "error" in line or "Traceback" in line]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert f"{last}: cannot save the checkpoint: no space left" in lines[0]
    assert last.read_bytes() == before
    assert not list(last.parent.glob(".*.tmp"))


@contextlib.contextmanager
def _as_nobody() -> Iterator[None]:
    """Act as user nobody (effective ids), so that file modes deny as they would for a user:
    root passes every permission check. Python's own files are read as root beforehand."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder user nobody can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="resnetlab-trust-"))
    path.chmod(0o755)
    yield path
    for p in [path, *path.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)
    shutil.rmtree(path)


def test_permission_errors_say_read_and_name_the_path(run: Path, open_dir: Path) -> None:
    model = open_dir / "model.pt"
    shutil.copy(run / "checkpoints" / "last.pt", model)
    model.chmod(0o644)
    images = _image_folder(open_dir / "images", per_class=64)
    for p in images.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    runs = open_dir / "runs"
    runs.mkdir(mode=0o777)
    runs.chmod(0o777)
    train = ["train", "data.name=folder", f"data.root={images}", f"run.root={runs}", "data.image_size=8",
             "data.resize=8", "data.num_workers=0", "train.epochs=1", *QUICK]
    assert _cli(["predict", str(model), str(images / "train")])[0] == 0  # readable: every module loaded
    (images / "train" / "a").chmod(0o700)
    with _as_nobody():
        predicted = _cli(["predict", str(model), str(images / "train")])
    images.chmod(0o700)
    with _as_nobody():
        trained = _cli([*train, "run.name=denied"])
    code, out, err = predicted
    assert code == 1 and "no image files" not in err and out.count("\n") == 64  # class b's images
    assert f"{images / 'train' / 'a'}: cannot read this folder: Permission denied (no permission to read it" in err
    code, _, err = trained
    assert code == 1 and err.count("\n") == 1, err
    assert str(images) in err and "no permission to read" in err and "write" not in err
    assert list(runs.iterdir()) == []  # the untrained run folder was removed
