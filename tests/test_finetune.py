"""Fine-tuning: model.init_from (head swap, key mismatches, provenance, safe loading), train.freeze
(frozen weights and BN statistics stay bitwise unchanged), per-layer learning rates, two-phase
resume, DDP, and the README's resnet50 command on a folder built here."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import resnetlab
from resnetlab import checkpoint as ckpt
from resnetlab.config import ConfigError
from resnetlab.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from resnetlab.engine import resume_config
from resnetlab.engine.freeze import expand_prefixes, freeze_for_epoch
from resnetlab.engine.optim import build_optimizer, build_param_groups, set_lr
from resnetlab.models import create_model
from resnetlab.weights import (
    InitSource,
    load_init_weights,
    preprocessing_meta,
    read_init_from,
    to_our_names,
)

FAST = ["train.quiet=true", "train.tensorboard=false", "optim.warmup=none", "seed=0"]
SOURCE = ["data.classes=[0,1,2,3,4]", "train.epochs=1", "train.batch_size=128", "optim.schedule=constant"]


def _cfg(root: Path, *overrides: str) -> resnetlab.Config:
    return resnetlab.load(None, [*FAST, f"run.root={root}", *overrides])


def _last(run_dir: Path) -> dict:
    return ckpt.load_checkpoint(run_dir / "checkpoints" / "last.pt")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet20 trained one epoch on digits 0-4 (a resnetlab run folder)."""
    root = tmp_path_factory.mktemp("pre")
    return resnetlab.train(_cfg(root, *SOURCE, "run.name=pre")).run_dir


def _bn_buffers(state: dict, prefixes: tuple[str, ...]) -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefixes) and
            k.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")}


# ---------------------------------------------------------------------------------------------- init_from


def test_head_is_reinitialised_when_the_class_count_differs(tmp_path: Path, caplog) -> None:
    src = create_model("resnet20", num_classes=10)
    path = tmp_path / "r20.pth"
    torch.save(src.state_dict(), path)
    cfg = resnetlab.load(None, [f"model.init_from={path}"])
    source = read_init_from(cfg)
    assert source is not None and source.kind == "torchvision"
    torch.manual_seed(1)
    model = create_model("resnet20", num_classes=5, in_chans=1)
    src1 = create_model("resnet20", num_classes=10, in_chans=1)  # 1-channel twin of the file
    torch.save(src1.state_dict(), path)
    source = read_init_from(cfg)
    fresh_fc = model.fc.weight.detach().clone()
    with caplog.at_level("INFO", logger="resnetlab"):
        load_init_weights(model, source, _meta(5))
    got, want = model.state_dict(), src1.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want if not k.startswith("fc."))
    assert torch.equal(model.fc.weight, fresh_fc) and model.fc.weight.shape == (5, 64)
    lines = [r.getMessage() for r in caplog.records if "re-initialised" in r.getMessage()]
    assert len(lines) == 1 and "5 classes" in lines[0] and "had 10" in lines[0]


def _meta(k: int, name: str = "digits"):
    from resnetlab.data import DataMeta

    return DataMeta(name=name, classes=tuple(str(i) for i in range(k)), in_chans=1, input_size=(8, 8),
                    mean=(0.3,), std=(0.4,))


def test_same_count_of_other_classes_gets_a_new_head_from_a_resnetlab_run(pretrained: Path, tmp_path: Path) -> None:
    res = resnetlab.train(_cfg(tmp_path, "data.classes=[5,6,7,8,9]", "train.epochs=1", "train.batch_size=64",
                               "data.train_per_class=20", "data.val_fraction=0", f"model.init_from={pretrained}",
                               "train.freeze=backbone", "run.name=ft"))
    src, ft = _last(pretrained)["model"], _last(res.run_dir)["model"]
    # the backbone is the pretrained one, untouched (frozen); the head was replaced and trained
    assert all(torch.equal(ft[k], src[k]) for k in src if not k.startswith("fc."))
    assert not torch.equal(ft["fc.weight"], src["fc.weight"])


def test_mismatched_keys_are_an_error_naming_them(tmp_path: Path) -> None:
    state = create_model("resnet20", num_classes=5, in_chans=1).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer2.0.conv1.weight"]
    model = create_model("resnet20", num_classes=5, in_chans=1)
    with pytest.raises(ckpt.CheckpointError) as e:
        load_init_weights(model, InitSource(tmp_path / "x.pth", "0" * 64, "torchvision", state, None), _meta(5))
    assert "missing: layer2.0.conv1.weight" in str(e.value) and "unexpected: extra.weight" in str(e.value)
    deeper = create_model("resnet32", num_classes=5, in_chans=1).state_dict()
    with pytest.raises(ckpt.CheckpointError, match=r"unexpected: layer1\.3\."):
        load_init_weights(model, InitSource(tmp_path / "y.pth", "0" * 64, "torchvision", deeper, None), _meta(5))


def test_provenance_path_and_sha256_in_config_yaml(pretrained: Path, tmp_path: Path) -> None:
    res = resnetlab.train(_cfg(tmp_path, *SOURCE, f"model.init_from={pretrained}", "run.name=prov"))
    saved = yaml.safe_load((res.run_dir / "config.yaml").read_text())["model"]
    file = pretrained / "checkpoints" / "best.pt"
    assert saved["init_from"] == str(file.resolve())
    assert saved["init_sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    # weights only: a fresh run from epoch 0 with its own optimiser
    state = _last(res.run_dir)["state"]
    assert state["epoch"] == 1 and state["step"] == _last(pretrained)["state"]["step"]
    # a pinned hash that does not match is refused before anything is trained
    with pytest.raises(ConfigError, match="SHA-256"):
        resnetlab.train(_cfg(tmp_path, *SOURCE, f"model.init_from={pretrained}", "run.name=pin",
                             "model.init_sha256=" + "f" * 64))


class _Gadget:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_gadget_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Gadget(marker)}, path)
    cfg = resnetlab.load(None, [f"model.init_from={path}"])
    with pytest.raises(ckpt.CheckpointError, match="refused to load"):
        read_init_from(cfg)
    assert not marker.exists()


def test_transformers_resnet_names_map_to_ours() -> None:
    ours = create_model("resnet50", num_classes=3).state_dict()
    # the Hugging Face transformers names (ResNetForImageClassification) of some of these keys
    theirs = {
        "resnet.embedder.embedder.convolution.weight": "conv1.weight",
        "resnet.embedder.embedder.normalization.running_var": "bn1.running_var",
        "resnet.encoder.stages.0.layers.0.shortcut.convolution.weight": "layer1.0.downsample.0.weight",
        "resnet.encoder.stages.0.layers.0.shortcut.normalization.bias": "layer1.0.downsample.1.bias",
        "resnet.encoder.stages.3.layers.2.layer.2.convolution.weight": "layer4.2.conv3.weight",
        "resnet.encoder.stages.1.layers.3.layer.0.normalization.weight": "layer2.3.bn1.weight",
        "classifier.1.weight": "fc.weight",
        "classifier.1.bias": "fc.bias",
    }
    mapped, kind = to_our_names({k: ours[v] for k, v in theirs.items()})
    assert kind == "transformers"
    assert set(mapped) == set(theirs.values())
    # DDP / torch.compile prefixes come off; timm/torchvision names stay as they are
    plain, kind = to_our_names({f"module.{k}": v for k, v in ours.items()})
    assert kind == "resnet" and set(plain) == set(ours)


def test_timm_style_safetensors_loads_and_preprocessing_follows_imagenet(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = create_model("resnet18", num_classes=1000)
    # as timm's hub files: torchvision's names, no num_batches_tracked buffers
    save_file({k: v.contiguous() for k, v in src.state_dict().items() if "num_batches" not in k},
              tmp_path / "model.safetensors")
    cfg = resnetlab.load(None, [f"model.init_from={tmp_path / 'model.safetensors'}"])
    source = read_init_from(cfg)
    assert source.kind == "timm"
    from resnetlab.data import DataMeta

    meta = DataMeta(name="folder", classes=("a", "b"), in_chans=3, input_size=(32, 32),
                    mean=(0.5,) * 3, std=(0.5,) * 3, resize=36)
    fitted = preprocessing_meta(meta, source, cfg)
    assert fitted.mean == IMAGENET_MEAN and fitted.std == IMAGENET_STD
    ours = resnetlab.load(None, [f"model.init_from={tmp_path / 'model.safetensors'}", "model.init_preprocess=data"])
    assert preprocessing_meta(meta, source, ours).mean == (0.5,) * 3
    model = create_model("resnet18", num_classes=2)
    load_init_weights(model, source, meta)
    assert torch.equal(model.layer4[1].conv2.weight, src.layer4[1].conv2.weight)


def test_resnetlab_source_sets_normalisation(pretrained: Path) -> None:
    cfg = resnetlab.load(None, [f"model.init_from={pretrained}"])
    source = read_init_from(cfg)
    assert source.kind == "resnetlab"
    fitted = preprocessing_meta(_meta(5), source, cfg)
    assert fitted.mean == source.meta.mean and fitted.mean != (0.3,)


def test_a_resumed_fine_tune_needs_no_init_from_file(pretrained: Path, tmp_path: Path) -> None:
    weights_file = tmp_path / "moved" / "pre.pt"
    weights_file.parent.mkdir()
    weights_file.write_bytes((pretrained / "checkpoints" / "last.pt").read_bytes())
    source_mean = _last(pretrained)["meta"]["mean"]
    common = ["data.classes=[5,6,7,8,9]", "data.train_per_class=20", "data.val_fraction=0",
              "train.batch_size=50", f"model.init_from={weights_file}", "run.name=ft"]
    first = resnetlab.train(_cfg(tmp_path, *common, "train.epochs=1"))
    assert _last(first.run_dir)["meta"]["mean"] == source_mean  # normalised as the weights expect
    digest = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    weights_file.unlink()
    with pytest.raises(ConfigError, match="neither a file nor a run folder"):  # a new run needs it
        resnetlab.train(_cfg(tmp_path, *common, "run.name=fresh"))
    second = resnetlab.train(resume_config(first.run_dir, ["train.epochs=2"]))
    assert second.epochs == 2 and second.interrupted is None
    last = _last(second.run_dir)
    assert last["state"]["epoch"] == 2 and last["meta"]["mean"] == source_mean  # same preprocessing
    saved = yaml.safe_load((first.run_dir / "config.yaml").read_text())["model"]
    assert saved["init_from"] == str(weights_file.resolve())  # provenance kept, though the file is gone
    assert saved["init_sha256"] == digest


# ---------------------------------------------------------------------------------------------- freeze


def test_frozen_parameters_and_bn_statistics_stay_bitwise_unchanged(tmp_path: Path) -> None:
    # grad checkpointing on: its recomputation must not touch frozen BN statistics either
    cfg = _cfg(tmp_path, *SOURCE, "train.freeze=[stem,layer1]", "model.grad_checkpointing=true",
               "model.checkpoint_stages=null", "optim.weight_decay=0.1", "run.name=frozen")
    seen = {}

    def on_step(info):
        if info["step"] == 1:
            seen["first"] = {k: v.clone() for k, v in info["model"].state_dict().items()}

    torch.manual_seed(0)
    init = create_model("resnet20", num_classes=5, in_chans=1).state_dict()
    res = resnetlab.train(cfg, on_step=on_step)
    after = _last(res.run_dir)["model"]
    frozen = ("conv1.", "bn1.", "layer1.")
    changed = [k for k in init if k.startswith(frozen) and not torch.equal(init[k], after[k])]
    assert not changed, changed
    assert _bn_buffers(after, frozen) and all(
        torch.equal(v, init[k]) for k, v in _bn_buffers(after, frozen).items())
    # the rest trained, BN statistics included
    assert not torch.equal(init["layer2.0.conv1.weight"], after["layer2.0.conv1.weight"])
    assert not torch.equal(init["layer3.0.bn1.running_mean"], after["layer3.0.bn1.running_mean"])


def test_freeze_prefixes_and_an_unknown_one() -> None:
    model = create_model("resnet20", num_classes=5, in_chans=1)
    assert expand_prefixes(model, ["stem"]) == ["conv1", "bn1", "relu", "maxpool"]
    assert "fc" not in expand_prefixes(model, ["backbone"]) and "layer3" in expand_prefixes(model, ["backbone"])
    with pytest.raises(ConfigError, match="'layer9'.*stem, backbone"):
        expand_prefixes(model, ["layer9"])


def test_per_layer_learning_rates_as_configured() -> None:
    cfg = resnetlab.load(None, ["optim.lr=0.1", "optim.backbone_lr_scale=0.5", "optim.layer_decay=0.1",
                                "train.freeze=layer1", "optim.fused=false"])
    model = create_model("resnet20", num_classes=5, in_chans=1)
    freeze_for_epoch(model, cfg.train, 0)
    opt = build_optimizer(model, cfg.optim, build_param_groups(model, cfg.optim, cfg.train))
    set_lr(opt, 0.1)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    want = {"fc.weight": 0.1, "layer3.0.conv1.weight": 0.1 * 0.5 * 0.1,
            "layer2.0.bn1.bias": 0.1 * 0.5 * 0.1**2, "conv1.weight": 0.1 * 0.5 * 0.1**4}
    for name, lr in want.items():
        assert lr_of[id(names[name])] == pytest.approx(lr, rel=1e-12), name
    assert id(names["layer1.0.conv1.weight"]) not in lr_of  # frozen for good: not in the optimiser


def test_two_phase_resumed_at_the_unfreeze_boundary_equals_straight_bitwise(pretrained: Path, tmp_path: Path) -> None:
    common = ["data.classes=[5,6,7,8,9]", "data.train_per_class=40", "data.val_fraction=0",
              "train.batch_size=50", "train.epochs=2", "train.unfreeze_at_epoch=1", "train.freeze=backbone",
              "optim.backbone_lr_scale=0.1", "optim.ema_decay=0.9", "optim.schedule=cosine",
              f"model.init_from={pretrained}"]
    straight = resnetlab.train(_cfg(tmp_path, *common, "run.name=straight"))
    first = resnetlab.train(_cfg(tmp_path, *common, "run.name=split"),
                            on_step=lambda info: info["step"] == 4)  # 200 images / 50: epoch 1's end
    assert first.interrupted == "stop" and first.epochs == 1
    mid = _last(first.run_dir)["model"]  # the probe phase's end
    second = resnetlab.train(resume_config(first.run_dir))
    a, b = _last(straight.run_dir), _last(second.run_dir)
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["state"] == b["state"]
    # phase 1 left the backbone alone, phase 2 trained it
    src = _last(pretrained)["model"]
    assert torch.equal(mid["layer1.0.conv1.weight"], src["layer1.0.conv1.weight"])
    assert not torch.equal(a["model"]["layer1.0.conv1.weight"], src["layer1.0.conv1.weight"])


@pytest.mark.slow
def test_ddp_fine_tune_with_freeze_and_unfreeze(pretrained: Path, tmp_path: Path) -> None:
    common = ["model.name=resnet20", "data.classes=[5,6,7,8,9]", "data.val_fraction=0", "train.device=cpu",
              "train.batch_size=128", "train.epochs=2", "train.unfreeze_at_epoch=1", "train.freeze=[stem,layer1]",
              "train.sync_bn=true", "train.channels_last=false", "optim.lr=0.001", "optim.schedule=constant",
              *FAST, f"model.init_from={pretrained}", f"run.root={tmp_path}"]
    one = resnetlab.train(resnetlab.load(None, [*common, "run.name=one"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "resnetlab", "train", *common, "run.name=two"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _last(one.run_dir)["model"], _last(tmp_path / "two")["model"]
    # same tolerance and reasoning as test_distributed.py: SyncBN over 2 ranks vs one process
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # epoch 2 trained the unfrozen stem on both ranks alike (the DDP wrapper was rebuilt)
    assert not torch.equal(b["conv1.weight"], _last(pretrained)["model"]["conv1.weight"])


# ---------------------------------------------------------------------------------------------- README


@pytest.mark.slow
def test_readme_resnet50_folder_command(tmp_path: Path) -> None:
    import torchvision

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("cats", "dogs"):
            (tmp_path / "photos" / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(tmp_path / "photos" / split / cls / f"{i}.jpg")
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "resnet50.pth")
    cmd = [sys.executable, "-m", "resnetlab", "train", "data.name=folder", "data.root=photos",
           "model.name=resnet50", "model.init_from=resnet50.pth", "train.freeze=backbone",
           # tiny: 32-pixel crops, one step
           "data.image_size=32", "data.resize=36", "data.val_fraction=0", "data.num_workers=0",
           "train.epochs=1", "train.batch_size=12", "train.quiet=true", "train.tensorboard=false",
           "run.name=pets"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "classifier re-initialised for 2 classes (the weights had 1000)" in proc.stderr
    saved = _last(tmp_path / "runs" / "pets")
    assert saved["meta"]["mean"] == list(IMAGENET_MEAN)
    tv = torch.load(tmp_path / "resnet50.pth", weights_only=True)
    assert torch.equal(saved["model"]["layer4.2.conv3.weight"], tv["layer4.2.conv3.weight"])
    assert torch.equal(saved["model"]["bn1.running_mean"], tv["bn1.running_mean"])  # frozen BN


# ---------------------------------------------------------------------------------------------- few-shot data, recipes, transfer


def test_class_subset_and_train_per_class() -> None:
    from resnetlab.config import DataConfig
    from resnetlab.data import DataError, build_datasets

    full = build_datasets(DataConfig(), seed=0)
    sub = build_datasets(DataConfig(classes=("7", "5"), train_per_class=10), seed=0)
    assert sub.meta.classes == ("7", "5")
    assert sub.train.labels.bincount().tolist() == [10, 10]
    # the test split is every 7 and 5 of the full test split, relabelled 7 -> 0, 5 -> 1
    want = full.test.labels[(full.test.labels == 7) | (full.test.labels == 5)]
    assert sub.test.labels.tolist() == [0 if y == 7 else 1 for y in want.tolist()]
    assert sub.meta.mean != full.meta.mean  # statistics of the 20 images trained on
    other = build_datasets(DataConfig(classes=("7", "5"), train_per_class=10), seed=1)
    assert not torch.equal(other.train.images, sub.train.images)  # the draw follows the seed
    with pytest.raises(DataError, match="'x' is not a class of digits"):
        build_datasets(DataConfig(classes=("x",)), seed=0)
    with pytest.raises(DataError, match="has only"):
        build_datasets(DataConfig(train_per_class=10_000), seed=0)


@pytest.mark.parametrize("name", ["finetune_probe", "finetune_two_phase"])
def test_finetune_recipes_load(name: str) -> None:
    from resnetlab.config import load

    path = Path(resnetlab.__file__).parent / "recipes" / f"{name}.yaml"
    cfg = load(path, ["model.init_from=somewhere.pth"])
    assert cfg.train.freeze == ("backbone",)
    if name == "finetune_two_phase":
        assert cfg.train.unfreeze_at_epoch == 3 and cfg.optim.backbone_lr_scale == 0.1


def test_two_phase_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="needs train.freeze"):
        resnetlab.load(None, ["train.unfreeze_at_epoch=2"])
    with pytest.raises(ConfigError, match="unfreeze_at_epoch must be in"):
        resnetlab.load(None, ["train.freeze=stem", "train.unfreeze_at_epoch=99", "train.epochs=5"])


def test_transfer_table_schedule_and_a_tiny_run(tmp_path: Path) -> None:
    from resnetlab.analysis import AnalysisError
    from resnetlab.analysis.transfer import finetune_schedule, parse_ways, run_transfer

    assert finetune_schedule(5, 100) == (25, 100) and finetune_schedule(50, 100) == (32, 15)
    with pytest.raises(AnalysisError, match="'fancy'"):
        parse_ways("scratch,fancy")
    res = run_transfer("2", "0", "scratch,probe", steps=2, pretrain_epochs=1, jobs=1,
                       overrides=[f"run.root={tmp_path}"])
    assert {(r["way"], r["n"]) for r in res.rows} == {("scratch", 2), ("probe", 2)}
    assert "| probe |" in res.markdown and res.figure.is_file()
    probe = _last(res.out_dir / "probe-n2-seed0")["model"]
    pre = _last(res.out_dir / "pretrain-seed0")["model"]
    assert torch.equal(probe["layer2.0.conv1.weight"], pre["layer2.0.conv1.weight"])
