"""The README, tested as written.

Every ``resnetlab ...`` / ``python -m resnetlab ...`` / ``torchrun ... -m resnetlab ...`` line in
the README's code blocks is collected and, without training anything:

- parsed by the real argument parser (a subcommand the parser does not know fails here, so a
  documented command cannot exist only in the README);
- its ``key=value`` overrides checked against the config keys;
- for ``train``, resolved with ``--print-config`` (recipe, overrides, validation);
- run for real when it is cheap and needs no files (``models``, ``info``, ``recipes``, ``config``).

Lines naming files that only exist after other commands (``runs/<name>``, ``~/data/...``,
``digit.png``) are checked at the parse level. Python blocks are compiled. Numbers the README
quotes from a measurement are compared with the committed result of the measuring command
(``docs/results/``), and the cheap measurements are recomputed here.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from resnetlab.cli import build_parser, main
from resnetlab.config import override_pairs

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CHEAP = {"models", "info", "recipes", "config"}  # run for real: no files, no training, < 1 s each
RESULTS = ROOT / "docs" / "results"


def code_blocks(text: str) -> list[tuple[int, str, list[str]]]:
    """``(first line number, language, lines)`` of every fenced code block."""
    blocks, lang, start, lines = [], None, 0, []
    for n, line in enumerate(text.splitlines(), start=1):
        fence = re.match(r"^\s*```(\w*)", line)
        if fence and lang is None:
            lang, start, lines = fence.group(1) or "text", n + 1, []
        elif fence:
            blocks.append((start, lang, lines))
            lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def _logical_lines(start: int, lines: list[str]) -> list[tuple[int, str]]:
    """Join ``\\``-continued lines; keep the number of the first."""
    out, buf, first = [], "", start
    for i, line in enumerate(lines):
        if not buf:
            first = start + i
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((first, buf + line))
        buf = ""
    return out


def resnetlab_argv(line: str) -> list[str] | None:
    """The arguments after ``resnetlab`` (or ``-m resnetlab``) in a shell line, else None."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return None
    for i, tok in enumerate(tokens):
        is_command = tok == "resnetlab" or tok.endswith("/resnetlab")
        if is_command and (i == 0 or tokens[i - 1] == "-m" or re.fullmatch(r"[A-Z_]+=\S*", tokens[i - 1])):
            return tokens[i + 1:]
        if tok in ("-c", "make"):  # python -c "...", make targets: not resnetlab commands
            return None
    return None


def readme_commands() -> list[tuple[int, list[str]]]:
    """``(line number, argv)`` of every resnetlab command in the README's code blocks."""
    out = []
    for start, lang, lines in code_blocks(README.read_text()):
        if lang not in ("text", "bash", "sh", "shell", "console"):
            continue
        for n, line in _logical_lines(start, lines):
            argv = resnetlab_argv(line.lstrip("$ "))
            if argv is not None:
                out.append((n, argv))
    return out


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check() -> None:
    subcommands = {argv[0] for _, argv in COMMANDS if argv}
    assert len(COMMANDS) >= 30 and {"train", "models", "info", "recipes", "eval", "predict"} <= subcommands


def _parse(argv: list[str], where: str, capsys):
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: does not parse: {capsys.readouterr().err.strip()}")
    if extra:  # main() takes key=value after options as overrides; nothing else
        assert hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra), \
            f"{where}: unrecognised arguments {extra}"
        args.overrides = [*args.overrides, *extra]
    return args


@pytest.mark.parametrize(("line", "argv"), COMMANDS, ids=[f"L{n}:{' '.join(a)[:50]}" for n, a in COMMANDS])
def test_readme_command_parses_and_validates(line: int, argv: list[str], capsys, tmp_path: Path,
                                            monkeypatch) -> None:
    where = f"README.md line {line}: resnetlab {' '.join(argv)}"
    monkeypatch.chdir(tmp_path)  # nothing a check does may land in the repository
    if argv in (["--help"], ["-h"], ["--version"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0, where
        return
    args = _parse(argv, where, capsys)
    overrides = getattr(args, "overrides", None)
    if overrides:
        override_pairs(overrides)  # every key exists and every word is key=value
    if args.command == "train" and not args.resume:
        assert main([*argv, "--print-config"]) == 0, f"{where}: {capsys.readouterr().err.strip()}"
        assert not any(tmp_path.iterdir()), f"{where}: --print-config created files"
    elif args.command in CHEAP:
        assert main(argv) == 0, f"{where}: {capsys.readouterr().err.strip()}"
        assert capsys.readouterr().out.strip(), f"{where}: printed nothing"


def test_readme_python_blocks_compile() -> None:
    blocks = [(n, "\n".join(lines)) for n, lang, lines in code_blocks(README.read_text()) if lang == "python"]
    assert blocks
    for n, src in blocks:
        compile(src, f"README.md:{n}", "exec")


# ---------------------------------------------------------------------------------------------- numbers


def test_readme_parameter_and_mac_counts_are_the_catalogs() -> None:
    from resnetlab.catalog import cached_rows

    text = README.read_text()
    rows = {r["name"]: r for r in cached_rows("*")}
    header = re.search(r"^\| model \| (resnet20 .*)\|$", text, re.M).group(1)
    ours = re.search(r"^\| resnetlab \| (.*)\|$", text, re.M).group(1)
    names = [c.strip() for c in header.split("|")]
    counts = [int(c.strip().replace(",", "")) for c in ours.split("|")]
    assert {n: rows[n]["params"] for n in names} == dict(zip(names, counts, strict=True))
    for name, shown in re.findall(r"(resnet\d+) (\d+\.\d+[MG])", text):
        macs = rows[name]["macs"]
        expect = f"{macs / 1e9:.2f}G" if shown.endswith("G") else f"{macs / 1e6:.1f}M"
        assert shown == expect, f"README says {name} {shown} multiply-adds, the catalog {expect}"


def _gradient_summary() -> dict:
    return json.loads((RESULTS / "gradients" / "summary.json").read_text())


def _block_counts(models: list[str]) -> dict[str, int]:
    import torch

    from resnetlab.analysis.gradients import _blocks
    from resnetlab.models import create_model

    with torch.device("meta"):
        return {m: len(_blocks(create_model(m))) for m in models}


def test_readme_gradient_ratios_are_the_committed_measurement() -> None:
    """The printed ratios in the README are what `resnetlab gradients` wrote to docs/results/."""
    doc = _gradient_summary()
    blocks = _block_counts(doc["models"])
    expected = "\n".join(
        f"{m}: gradient norm block 1 / block {blocks[m]} = "
        + ", ".join(f"{v:.3g} {phase}" for phase, v in doc["ratio_first_to_last_block"][m].items())
        for m in doc["models"])
    assert expected in README.read_text(), f"README's gradient block differs from {RESULTS}/gradients:\n{expected}"


def test_readme_gradient_paragraph_is_the_committed_measurement() -> None:
    """The sentences reading the gradient run (spans, peak block) are made from its committed CSV."""
    import csv

    from resnetlab.analysis.findings import gradient_paragraph

    doc = _gradient_summary()
    with (RESULTS / "gradients" / "gradients.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    expected = gradient_paragraph(doc["ratio_first_to_last_block"], rows, doc["steps"])
    assert expected in " ".join(README.read_text().split()), f"README's gradient paragraph differs:\n{expected}"


def test_readme_responses_are_the_committed_run() -> None:
    """The layer-responses table and the sentences under it are made from docs/results/responses."""
    import csv

    from resnetlab.analysis.findings import responses_sentence, training_errors_sentence
    from resnetlab.analysis.plots import read_run_metrics
    from resnetlab.analysis.responses import responses_markdown, summarize_responses

    folder = RESULTS / "responses"
    with (folder / "responses.csv").open(newline="") as f:
        summary = summarize_responses([{**r, "std": float(r["std"])} for r in csv.DictReader(f)])
    errors = {m: read_run_metrics(folder / m)[-1]["train_err"] for m in summary}
    epochs = json.loads((folder / "plain20" / "result.json").read_text())["epochs"]
    text = README.read_text()
    assert responses_markdown(summary) in text, "README's responses table differs from docs/results/responses"
    sentences = (responses_sentence(summary, [("plain20", "resnet20"), ("plain56", "resnet56")]) + " "
                 + training_errors_sentence(errors, epochs))
    assert sentences in " ".join(text.split()), f"README's responses sentences differ:\n{sentences}"


def test_gradient_ratios_at_init_recomputed(tmp_path: Path) -> None:
    """Recompute the cheap half (initialisation: one forward/backward per model) and compare.

    The init weights, the split and the probe batch are seeded, so only float32 rounding can
    differ between CPUs: kernels that sum in another order move each norm by ~1e-6 relative, and
    a ratio of two norms by about twice that. rtol 1e-3 leaves a wide margin and still catches
    any change of the method, the data or the models. (The after-training values depend on 100
    steps of SGD and are compared with the committed file only.)
    """
    from resnetlab.analysis.gradients import gradient_flow

    doc = _gradient_summary()
    res = gradient_flow(doc["models"], doc["data"], steps=0, seed=doc["seed"],
                        overrides=[f"run.root={tmp_path}", "run.name=g"])
    for m in doc["models"]:
        assert res.ratios[m]["init"] == pytest.approx(doc["ratio_first_to_last_block"][m]["init"], rel=1e-3), m


def test_readme_make_train_accuracy_is_the_committed_run() -> None:
    """The Quick start's accuracy, test-image count and best epoch are docs/results/make-train's."""
    doc = json.loads((RESULTS / "make-train" / "result.json").read_text())
    test, best = doc["test"], doc["best"]
    expected = (f"reached **{test['top1_acc']:.2f}%** top-1 accuracy on the {test['count']} test images, "
                f"with the\nweights of its best validation epoch ({best['epoch']} of {doc['epochs']};")
    assert expected in README.read_text(), f"README's make train numbers differ from {RESULTS}/make-train:\n{expected}"
    assert test["weights"] == "best" and test["top1_acc"] >= 98.0  # the accuracy `make train` promises


def test_readme_fashion_table_is_the_committed_run() -> None:
    """The Fashion-MNIST table in the README is generated from docs/results/fashion-table (never typed)."""
    from resnetlab.analysis.fashion_table import readme_block

    expected = readme_block(RESULTS / "fashion-table", shown="docs/results/fashion-table")
    assert expected in README.read_text(), ("README's Fashion-MNIST table differs from docs/results/fashion-table; "
                                            "run python -m resnetlab.analysis.fashion_table")


def test_readme_speedrun_is_the_committed_benchmark() -> None:
    """The speedrun sentence in the README is benchmarks/results/speedrun.json's."""
    from benchmarks.bench_speedrun import readme_sentence

    doc = json.loads((ROOT / "benchmarks" / "results" / "speedrun.json").read_text())
    expected = readme_sentence(doc)
    assert expected in " ".join(README.read_text().split()), f"README's speedrun numbers differ:\n{expected}"


def test_readme_included_results_are_the_committed_files() -> None:
    """Every `<!-- include PATH -->` block is PATH's text verbatim (tools/readme_include.py)."""
    from tools.readme_include import blocks

    found = blocks(README.read_text())
    assert found, "README has no include blocks; the Fashion-MNIST degradation table is one"
    for path, text in found:
        committed = (ROOT / path).read_text().strip()
        assert text.strip() == committed, f"README's copy of {path} differs: run python tools/readme_include.py"
