"""The science on Fashion-MNIST: the leaderboard table, --data from the registry, the deep nets'
warm-up, transfer between sources, the speedrun recipe. Tiny nets and tiny data only."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from resnetlab.analysis import AnalysisError
from resnetlab.analysis import fashion_table as ft
from resnetlab.analysis.degradation import (
    DEEP_WARMUP_FACTOR,
    DEEP_WARMUP_STEPS,
    base_config,
    data_choices,
    deep_warmup,
    recipe_for,
)
from resnetlab.config import load

ROOT = Path(__file__).resolve().parents[1]


def test_published_rows_are_the_fashion_mnist_readme() -> None:
    """Each published accuracy is the one on its leaderboard line (Debian's copy of the README)."""
    if not ft.DEBIAN_README.is_file():
        pytest.skip(f"{ft.DEBIAN_README} (Debian dataset-fashion-mnist) is not installed")
    rows = {r["model"]: r for r in ft.published_rows()}
    assert rows["ResNet18"]["test_acc"] == 94.9 and rows["Human Performance"]["test_acc"] == 83.5
    assert rows["DenseNet-BC 768K params"]["params"] == 768_000 and len(rows) == len(ft.PUBLISHED)


def test_a_published_row_that_disagrees_with_the_readme_is_refused(tmp_path: Path) -> None:
    readme = tmp_path / "README.md.gz"
    lines = [f"{key} something | {acc:.3f} | - | x |" for _, key, _, acc in ft.PUBLISHED]
    lines[0] = lines[0].replace(f"{ft.PUBLISHED[0][3]:.3f}", "0.900")
    readme.write_bytes(gzip.compress("\n".join(lines).encode()))
    with pytest.raises(AnalysisError, match=f"{ft.PUBLISHED[0][0]}.*0.900"):
        ft.published_rows(readme)
    assert len(ft.published_rows(tmp_path / "absent.md")) == len(ft.PUBLISHED)  # not installed: the table's


def test_every_net_has_its_recipe_and_plain_twins_share_it() -> None:
    for m in ft.MODELS:
        cfg = load(ft.recipe_for(m), [f"model.name={m}"])
        assert cfg.data.name == "fashion_mnist" and cfg.model.name == m
    assert ft.recipe_for("plain56") == ft.recipe_for("resnet56") == "fashion_mnist_resnet56"
    r110 = load("fashion_mnist_resnet110")
    assert (r110.optim.warmup, r110.optim.warmup_lr, r110.optim.lr) == ("constant", 0.01, 0.1)
    with pytest.raises(AnalysisError, match="^models names 'resnet32', which is not a net of the table"):
        ft.parse_models("resnet20,resnet32")


def test_plan_applies_epochs_subset_and_threads(tmp_path: Path) -> None:
    cfgs = ft.plan(["resnet20", "plain20"], [0, 1], tmp_path, epochs=2, train_images=500,
                   overrides=["train.batch_size=32"], jobs=2)
    assert [(c.model.name, c.seed) for c in cfgs] == [("resnet20", 0), ("resnet20", 1), ("plain20", 0), ("plain20", 1)]
    assert {(c.train.epochs, c.data.train_per_class, c.train.batch_size, c.train.threads) for c in cfgs} == {(2, 50, 32, 1)}


def test_table_rows_mean_std_and_targets() -> None:
    runs = [{"model": "resnet20", "seed": s, "epochs": 3, "train_images": 5000, "test_acc": a, "wall_seconds": 60.0}
            for s, a in ((0, 90.0), (1, 92.0))] + \
           [{"model": "plain20", "seed": 0, "epochs": 3, "train_images": 5000, "test_acc": 95.0, "wall_seconds": 30.0}]
    rows = ft.table_rows(runs)
    assert [r["model"] for r in rows] == ["resnet20", "plain20"]  # the table's order, not the runs'
    r20 = rows[0]
    assert r20["test_acc"] == 91.0 and r20["test_acc_std"] == pytest.approx(2 ** 0.5) and r20["seeds"] == 2
    assert r20["params"] == 269_434  # resnet20 for 1 channel and 10 classes
    md = ft.table_markdown(rows, ft.published_rows(None), {"seeds": [0, 1], "machine": "m", "published_source": "s"})
    assert "| resnet20 | ours | 269K | 2 | 3 | 5,000 | 91.00 ± 1.41 | 1.0 min | 94.0 (not met) |" in md
    assert "| plain20 | ours | 269K | 1 | 3 | 5,000 | 95.00 ± n/a | 0.5 min | - |" in md
    assert "| Human Performance | published | - | - | - | - | - | 83.5 | - | - |" not in md  # 9 columns
    assert "| Human Performance | published | - | - | - | - | 83.5 | - | - |" in md


def test_readme_block_round_trip(tmp_path: Path) -> None:
    res = tmp_path / "res"
    res.mkdir()
    (res / "table.md").write_text("| a |\n|---|\n")
    (res / "experiment.json").write_text(json.dumps({"epochs": 3, "train_images": 5000, "seeds": [0],
                                                     "machine": "2-core CPU", "time": "t", "wall_seconds": 600}))
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{ft.README_BEGIN}\nstale\n{ft.README_END}\nafter\n")
    assert ft.render_readme(readme, res) is True
    text = readme.read_text()
    assert "stale" not in text and "3 epochs on a seeded 5,000-image training subset" in text
    assert text.startswith("before\n") and text.endswith("after\n") and "| a |" in text
    assert ft.render_readme(readme, res) is False  # idempotent


def test_data_choices_are_the_registry_and_fashion_uses_its_recipe() -> None:
    from resnetlab.data.sources import source_names

    assert data_choices() == source_names(split_folders=False) and "fashion_mnist" in data_choices()
    rec = recipe_for("fashion_mnist")
    assert rec["data"]["name"] == "fashion_mnist" and rec["train"]["test_every_epoch"] is True
    cfg = base_config("fashion_mnist", ["data.train_per_class=20"], epochs=2)
    packaged = load("fashion_mnist")
    assert (cfg.optim, cfg.data.augment, cfg.train.epochs) == (packaged.optim, packaged.data.augment, 2)
    assert base_config("digits").optim.lr == 0.05  # the experiment's own digits recipe stays
    with pytest.raises(AnalysisError, match="^data must be one of"):
        base_config("svhn")


def test_deep_nets_get_the_papers_warm_up() -> None:
    base = base_config("fashion_mnist", epochs=10)
    steps = 421  # per epoch: 54,000 images in batches of 128
    deep = deep_warmup(base.__class__(**{**base.__dict__, "model": base.model.__class__(name="resnet110")}), steps)
    assert (deep.optim.warmup, deep.optim.warmup_lr) == ("constant", pytest.approx(base.optim.lr * DEEP_WARMUP_FACTOR))
    assert deep.optim.warmup_epochs == pytest.approx(DEEP_WARMUP_STEPS / steps, abs=1e-3)
    shallow = base.__class__(**{**base.__dict__, "model": base.model.__class__(name="resnet56")})
    assert deep_warmup(shallow, steps) is shallow
    # a short run: at most a fifth of it (digits: 9 steps per epoch, 20 epochs -> 36 steps = 4 epochs)
    d = base_config("digits")
    d110 = deep_warmup(d.__class__(**{**d.__dict__, "model": d.model.__class__(name="plain110")}), 9)
    assert d110.optim.warmup_epochs == pytest.approx(0.2 * d.train.epochs)
    # the user's own warm-up wins
    mine = d.__class__(**{**d.__dict__, "model": d.model.__class__(name="resnet110")})
    assert deep_warmup(mine, 9, ["optim.warmup_epochs=1"]) is mine


def test_transfer_plan_fashion_to_digits(tmp_path: Path) -> None:
    from resnetlab.analysis.transfer import plan

    pre, fine = plan([5], [0], ["scratch", "finetune"], tmp_path, steps=10, pretrain_epochs=1, overrides=[],
                     jobs=1, source="fashion_mnist", target="digits", pretrain_images=100, target_classes=10)
    assert pre[0].data.name == "fashion_mnist" and pre[0].data.classes == () and pre[0].data.train_per_class == 10
    assert pre[0].data.augment.flip is True  # Fashion-MNIST's own recipe
    assert {(c.data.name, c.data.classes, c.data.train_per_class, c.train.batch_size) for c in fine} == {
        ("digits", (), 5, 32)}
    assert [c.model.init_from is None for c in fine] == [True, False]


def test_gradients_on_fashion_mnist_tiny(tmp_path: Path) -> None:
    """--data reaches the real Fashion-MNIST files: one step of resnet20 on 20 images per class."""
    from resnetlab.analysis.gradients import gradient_flow

    res = gradient_flow(["resnet20"], "fashion_mnist", steps=1, seed=0,
                        overrides=[f"run.root={tmp_path}", "run.name=g", "data.train_per_class=20",
                                   "train.batch_size=32"])
    doc = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert doc["data"] == "fashion_mnist" and set(res.ratios["resnet20"]) == {"init", "after 1 steps"}


def test_speedrun_recipe() -> None:
    cfg = load("fashion_speedrun")
    assert (cfg.data.name, cfg.data.val_fraction, cfg.train.test_at_end) == ("fashion_mnist", 0.0, True)
    import torch
    from benchmarks.bench_speedrun import per_class_indices

    labels = torch.arange(100) % 10
    idx = per_class_indices(labels, 3, seed=1)
    assert len(idx) == 30 and sorted(labels[idx].tolist()) == sorted(list(range(10)) * 3)
    assert idx == per_class_indices(labels, 3, seed=1) != per_class_indices(labels, 3, seed=2)


def test_transfer_table_says_what_pretraining_gains() -> None:
    from resnetlab.analysis.transfer import table_markdown

    rows = [{"way": w, "n": n, "seeds": 2, "test_acc_mean": a, "test_acc_std": 1.0}
            for w, n, a in (("scratch", 5, 80.0), ("probe", 5, 70.0), ("finetune", 5, 86.5),
                            ("scratch", 10, 90.0), ("probe", 10, 88.0), ("finetune", 10, 89.0))]
    md = table_markdown(rows, [5, 10], ["scratch", "probe", "finetune"], source="fashion_mnist", target="digits")
    assert "| **pretraining's gain** | +6.5 (finetune) | -1.0 (finetune) |" in md
    assert "tested on the whole digits test split" in md and "(fashion_mnist)" not in md  # no pretrain given


def test_fashion_table_refuses_bad_arguments_before_training(tmp_path: Path) -> None:
    with pytest.raises(AnalysisError, match="^train_images must be a positive multiple of 10"):
        ft.run_fashion_table("resnet20", "0", epochs=1, train_images=15, overrides=[f"run.root={tmp_path}"])
    with pytest.raises(AnalysisError, match=r"^overrides may not set model.name .*the experiment sets the nets, seeds and data itself"):
        ft.run_fashion_table("resnet20", "0", overrides=["model.name=resnet56"])
    with pytest.raises(AnalysisError, match="^epochs must be an integer from 1"):
        ft.run_fashion_table("resnet20", "0", epochs=0)
    assert not any(tmp_path.iterdir())  # nothing written


def test_committed_fashion_table_names_no_machine_path_and_reads_the_same_anywhere(tmp_path: Path) -> None:
    """The README block comes from the results alone: a copy elsewhere gives the same text, and the
    committed records name the run root relative to the repository, not a machine's /tmp."""
    import shutil

    results = ROOT / "docs" / "results" / "fashion-table"
    for f in [results / "experiment.json", *results.glob("*/config.yaml"), *results.glob("*/result.json")]:
        assert "/tmp/" not in f.read_text() and "/home/" not in f.read_text(), f
    copy = shutil.copytree(results, tmp_path / "elsewhere")
    shown = "docs/results/fashion-table"
    assert ft.readme_block(copy, shown=shown) == ft.readme_block(results, shown=shown)
