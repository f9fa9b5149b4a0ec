"""``resnetlab publish RUN OUT/``: a run (or checkpoint) in the layout the model hubs expect.

    OUT/model.safetensors   the weights under the model's parameter names (torchvision's for the
                            ImageNet nets); the header carries the config and data meta, so
                            ``resnetlab.load(OUT)`` and ``model.init_from=OUT`` read it back
    OUT/config.json         timm's ``save_for_hf`` shape: architecture, num_classes, num_features,
                            label_names, pretrained_cfg (input size, interpolation, crop, mean,
                            std), model_args; resnetlab's own card data under "resnetlab"
    OUT/README.md           the model card: Hugging Face YAML header (license, library_name, tags,
                            datasets, metrics, model-index) and the run's numbers, figures, command
    OUT/train_config.yaml   the resolved training config: ``resnetlab train -c`` it to re-train
    OUT/*.png               the run's confusion matrix and reliability diagram, where measured

A temperature fitted by ``resnetlab calibrate`` is folded into the classifier (weight and bias
divided by T), so every consumer, timm included, gets calibrated probabilities; the card gives
ECE before and after. Where timm knows the architecture under the same name and parameter names
(resnet18/34/50/101/152 with torchvision's layout), ``timm.create_model("local-dir:OUT", pretrained=True)`` loads
the folder too.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from resnetlab import __version__
from resnetlab import checkpoint as ckpt
from resnetlab.calibration import apply_temperature, read_temperature
from resnetlab.config import Config, to_dict
from resnetlab.data import DataError, DataMeta
from resnetlab.params import mention
from resnetlab.weights.zoo import CARD_FILE, CONFIG_FILE, MODEL_FILE, WeightsError, pretrained_cfg

TRAIN_CONFIG = "train_config.yaml"
# Architectures timm builds under the same name with the same parameter names as ours.
TIMM_SAME = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
             "resnext50_32x4d", "densenet121", "densenet161", "densenet169", "densenet201")
LICENSE = "mit"  # the package's licence; weights trained by resnetlab carry it


@dataclass
class PublishResult:
    """The folder written and its files."""

    folder: Path
    files: list[Path]
    card: dict[str, Any]  # the "resnetlab" section of config.json


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _budget(run: Path | None, cfg: Config) -> dict[str, Any]:
    """What the training cost: epochs run, images seen per epoch, wall time (from metrics.jsonl)."""
    out: dict[str, Any] = {"epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size}
    rows = []
    if run is not None and (run / "metrics.jsonl").is_file():
        for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "epoch" in row:
                rows.append(row)
    if rows:
        out["epochs_run"] = max(int(r["epoch"]) for r in rows)
        secs = [float(r["seconds"]) for r in rows if isinstance(r.get("seconds"), (int, float))]
        if secs:
            out["train_seconds"] = round(sum(secs), 1)
    if cfg.data.train_per_class:
        out["train_per_class"] = cfg.data.train_per_class
    return out


def card_markdown(name: str, doc: Mapping[str, Any], figures: list[str]) -> str:
    """The model card: YAML header for the hubs, then the numbers and how to reproduce them."""
    card = doc["resnetlab"]
    test = card.get("metrics", {}).get("test", {})
    dataset = card["dataset"]
    header: dict[str, Any] = {
        "license": LICENSE,
        "library_name": "timm" if card.get("timm_compatible") else "resnetlab",
        "tags": ["image-classification", "resnetlab", doc["architecture"]] + (["timm"] if card.get("timm_compatible") else []),
        "datasets": [dataset],
        "metrics": ["accuracy"],
    }
    if test.get("top1_acc") is not None:
        header["model-index"] = [{"name": name, "results": [{
            "task": {"type": "image-classification", "name": "Image Classification"},
            "dataset": {"name": dataset, "type": dataset, "split": "test"},
            "metrics": [{"type": "accuracy", "value": round(test["top1_acc"], 2), "name": "Top-1 accuracy"}]
                       + ([{"type": "ece", "value": round(test["ece"], 2), "name": "Expected calibration error (15 bins, %)"}]
                          if "ece" in test else [])}]}]
    cfg = doc["pretrained_cfg"]
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
             f"# {name}", "",
             (f"{doc['architecture']} imported from {card['origin'].get('kind')} weights by resnetlab {card['version']}"
              if card.get("origin") else f"{doc['architecture']} trained by resnetlab {card['version']} on {dataset}")
             + " "
             f"({doc['num_classes']} classes: {', '.join(doc['label_names'][:10])}"
             f"{', ...' if len(doc['label_names']) > 10 else ''}).", "",
             "## Numbers", "",
             "| | |", "|---|---|",
             f"| parameters | {card['num_params']:,} |",
             f"| multiply-adds per image | {card['macs']:,} |",
             f"| input | {cfg['input_size'][0]} x {cfg['input_size'][1]} x {cfg['input_size'][2]}, "
             f"mean {cfg['mean']}, std {cfg['std']}, {cfg['interpolation']} |"]
    for split, m in card.get("metrics", {}).items():
        if m.get("top1_acc") is not None:
            lines.append(f"| {split} top-1 accuracy ({m.get('count', '?')} images) | {m['top1_acc']:.2f}% |")
        if m.get("ece") is not None:
            lines.append(f"| {split} ECE, 15 bins | {m['ece']:.2f}%"
                         + (f" (before temperature scaling: {m['ece_before']:.2f}%)" if "ece_before" in m else "")
                         + " |")
    if card.get("calibration"):
        lines.append(f"| temperature (fitted on val, folded into the classifier) | {card['calibration']['temperature']:.3f} |")
    budget = card.get("budget", {})
    if budget:  # imported weights were not trained here: no budget to state
        lines.append("| training budget (seconds: wall clock) | " + ", ".join(f"{k} {v}" for k, v in budget.items()) + " |")
    lines += ["", "## Use", "", "```python", "import resnetlab", "",
              f"model = resnetlab.create_model({doc['architecture']!r}, weights=PATH_OR_NAME)  # or resnetlab.load(PATH)",
              "transforms = resnetlab.weights.get(PATH_OR_NAME).transforms()",
              "probs = model.eval()(transforms(image)[None]).softmax(1)", "```", ""]
    if card.get("timm_compatible"):
        lines += ["timm reads the folder as it is: `timm.create_model(\"local-dir:PATH\", pretrained=True)`.", ""]
    lines += ["## How it was made", "", "```", card["command"], "```", ""]
    if not card.get("origin"):
        lines += [f"`{TRAIN_CONFIG}` is the resolved configuration (seed, split, schedule); "
                  f"`resnetlab train -c {TRAIN_CONFIG}` trains it again.", ""]
    if card.get("notes"):
        lines += [card["notes"], ""]
    for fig in figures:
        lines += [f"![{fig}]({fig})", ""]
    return "\n".join(lines)


def _measure(path: str | Path, tmp_out: Path) -> tuple[dict[str, dict[str, Any]], list[Path]]:
    """The checkpoint's test (else val) numbers and figures, written into ``tmp_out``."""
    from resnetlab.evaluate import evaluate_checkpoint

    metrics: dict[str, dict[str, Any]] = {}
    figures: list[Path] = []
    for split in ("test", "val"):
        try:
            report = evaluate_checkpoint(path, split, out_dir=tmp_out)
        except DataError:  # the data are not here (an imported ImageNet net) or have no such split
            continue
        metrics[split] = {k: report.metrics[k] for k in ("top1_acc", "top5_acc", "loss", "count", "ece", "nll",
                                                         "ece_calibrated", "nll_calibrated", "temperature")
                          if k in report.metrics}
        figures += [Path(report.files["confusion_png"]), Path(report.files["reliability_png"])]
        break
    return metrics, figures


def _calibrate(model: nn.Module, metrics: dict[str, dict[str, Any]],
               temperature: float | None) -> dict[str, Any] | None:
    """Divide ``model``'s logits by ``temperature`` (``resnetlab calibrate``; None: leave it) and
    make ``metrics``' ECE and NLL the calibrated ones, as the published logits are; the card's
    ``calibration`` entry (None without a temperature)."""
    if temperature is None:
        return None
    apply_temperature(model, temperature)
    for m in metrics.values():
        if "ece_calibrated" in m:
            m["ece_before"], m["nll_before"] = m["ece"], m["nll"]
            m["ece"], m["nll"] = m.pop("ece_calibrated"), m.pop("nll_calibrated")
        m.pop("temperature", None)
    return {"temperature": temperature, "fitted_on": "val"}


def _hub_config(name: str, arch: str, meta: DataMeta, model: nn.Module, card: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` in timm's ``save_for_hf`` shape, with resnetlab's ``card`` under "resnetlab"."""
    return {"architecture": arch, "num_classes": len(meta.classes),
            "num_features": int(getattr(model, "num_features", 0)), "global_pool": "avg",
            "label_names": list(meta.classes),
            "pretrained_cfg": {"tag": name.split(".", 1)[1] if "." in name else name, "custom_load": False,
                               **pretrained_cfg(meta), "fixed_input_size": False,
                               "num_classes": len(meta.classes), "first_conv": "conv1", "classifier": "fc",
                               "license": LICENSE},
            "model_args": {"in_chans": meta.in_chans},
            "resnetlab": card}


def _write_folder(dest: Path, model: nn.Module, cfg: Config, meta: DataMeta, doc: dict[str, Any],
                  figures: list[Path]) -> list[Path]:
    """Write model.safetensors, config.json (``doc``), train_config.yaml, the figures and the
    README.md card into ``dest`` (each file atomically); the files written."""
    header = {**ckpt.safetensors_header(cfg, meta.to_dict()), "format": "pt"}  # "pt": timm's loader
    dest.mkdir(parents=True, exist_ok=True)
    written = [dest / MODEL_FILE, dest / CONFIG_FILE, dest / TRAIN_CONFIG, dest / CARD_FILE]
    ckpt.save_safetensors(model, dest / MODEL_FILE, metadata=header)
    ckpt.atomic_write(dest / CONFIG_FILE, lambda f: f.write((json.dumps(doc, indent=2) + "\n").encode()))
    train_cfg = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    ckpt.atomic_write(dest / TRAIN_CONFIG, lambda f: f.write(train_cfg.encode()))
    for fig in figures:
        if fig.is_file():
            shutil.copyfile(fig, dest / fig.name)
            written.append(dest / fig.name)
    text = card_markdown(dest.name, doc, [f.name for f in figures if f.is_file()])
    ckpt.atomic_write(dest / CARD_FILE, lambda f: f.write(text.encode()))
    return written


def publish(path: str | Path, out: str | Path, *, force: bool = False, command: str | None = None,
            extra_card: Mapping[str, Any] | None = None, measure: bool = True) -> PublishResult:
    """Write ``path`` (run folder, checkpoint or exported safetensors) to the folder ``out``.

    ``command``: how the weights were made, for the card (default: train the shipped
    ``train_config.yaml``). ``extra_card``: more keys for config.json's "resnetlab" section
    (recipe, budget, notes, default). ``measure``: evaluate on the test split (else val) for the
    card's numbers and figures; weights whose data are not on this machine get none. An
    existing non-empty ``out`` is refused unless ``force``.
    """
    import tempfile

    from resnetlab.inference import build_inference_model, read_checkpoint
    from resnetlab.models import count_macs, count_params

    dest = Path(out).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not force:
        raise mention(WeightsError, f"{dest}: exists and is not an empty folder; pass force=True to "
                      "overwrite its files or name another folder", force="force=True")
    file, state, cfg, meta = read_checkpoint(path)
    run = Path(path).expanduser() if Path(path).expanduser().is_dir() else None
    origin = ckpt.read(file).source if file.suffix == ".pt" else None  # set by `resnetlab import`
    if command is None and origin and origin.get("kind") == "torchvision":
        command = f"resnetlab import torchvision {origin.get('file')} --arch {origin.get('arch')}"
    model = build_inference_model(state, cfg, meta, source=str(file))
    temperature = read_temperature(path, file)
    with tempfile.TemporaryDirectory() as tmp:
        metrics, figures = _measure(path, Path(tmp)) if measure else ({}, [])
        calibration = _calibrate(model, metrics, temperature)  # the published logits are the calibrated ones
        name = dest.name
        timm_ok = cfg.model.name in TIMM_SAME and meta.in_chans in (1, 3)
        card: dict[str, Any] = {
            "name": name, "version": __version__, "dataset": meta.name, "source": str(file),
            "num_params": count_params(model), "macs": count_macs(model, (meta.in_chans, *meta.input_size)),
            "metrics": metrics, "budget": _budget(run, cfg) if origin is None else {}, "timm_compatible": timm_ok,
            "command": command or f"resnetlab train -c {TRAIN_CONFIG}",
            "calibration": calibration, "origin": origin, "data_meta": meta.to_dict(), "config": to_dict(cfg),
            **dict(extra_card or {}),
        }
        doc = _hub_config(name, cfg.model.name, meta, model, card)
        written = _write_folder(dest, model, cfg, meta, doc, figures)
    return PublishResult(dest, written, card)


__all__ = ["TIMM_SAME", "TRAIN_CONFIG", "PublishResult", "card_markdown", "publish"]
