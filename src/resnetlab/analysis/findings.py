"""Sentences that state a measured number, made from the results they describe.

The lesson notebook prints these instead of typing numbers into its prose, and the README's
paragraphs about committed results are compared with them by ``tests/test_readme.py``, so a
sentence cannot drift from its numbers: rerun the measurement and the sentence changes with it.
Every function takes plain dicts (what the analyses return or write to JSON/CSV) and returns
one or more sentences ending in a full stop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: Percentage points of training error below which two nets are "too close to tell apart" in
#: one run: one seed's spread on digits (the README's 3-seed table has stds of several points).
CLOSE_POINTS = 5.0


def compare_training(train_err: Mapping[str, float], shallow: str, deep: str, epochs: int) -> str:
    """``"After 10 epoch(s) plain56's training error is 80.1%, plain20's 12.3%: ..."``.

    ``train_err``: model -> final training error in percent (``metrics.jsonl``'s ``train_err``).
    The verdict compares the deeper net with the shallower one, :data:`CLOSE_POINTS` apart.
    """
    a, b = float(train_err[shallow]), float(train_err[deep])
    gap = b - a
    if gap > CLOSE_POINTS:
        verdict = f"the deeper net trains worse, {gap:.1f} points higher"
    elif gap < -CLOSE_POINTS:
        verdict = f"the deeper net trains better, {-gap:.1f} points lower"
    else:
        verdict = f"within {CLOSE_POINTS:g} points of each other ({gap:+.1f}), too close to tell apart in one run"
    return f"After {epochs} epoch(s) {deep}'s training error is {b:.1f}% and {shallow}'s {a:.1f}%: {verdict}."


def gradient_ratio_sentences(ratios: Mapping[str, Mapping[str, float]], blocks: Mapping[str, int]) -> list[str]:
    """One sentence per model and phase: first-block / last-block output-gradient norm.

    ``ratios``: model -> phase (``"init"``, ``"after 100 steps"``) -> ratio, as
    :func:`resnetlab.analysis.gradients.gradient_flow` returns and ``summary.json`` stores;
    ``blocks``: model -> number of blocks (the ratio's denominator is the last one).
    """
    out = []
    for model, by_phase in ratios.items():
        for phase, r in by_phase.items():
            when = "at initialisation" if phase == "init" else phase
            out.append(f"{model} {when}: the gradient at block 1's output is {r:.3g} times the one at "
                       f"block {blocks[model]}'s.")
    return out


def block_spans(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, tuple[float, int]]]:
    """model -> phase -> (largest / smallest block-output gradient norm, block index of the largest).

    ``rows``: ``gradients.csv`` rows (``model, phase, kind, index, grad_norm``; index 1 = nearest
    the input); only ``kind == "block"`` rows count.
    """
    norms: dict[str, dict[str, dict[int, float]]] = {}
    for r in rows:
        if r["kind"] == "block":
            norms.setdefault(str(r["model"]), {}).setdefault(str(r["phase"]), {})[int(r["index"])] = float(r["grad_norm"])
    return {m: {p: (max(v.values()) / min(v.values()), max(v, key=lambda i: v[i])) for p, v in by_phase.items()}
            for m, by_phase in norms.items()}


def gradient_paragraph(ratios: Mapping[str, Mapping[str, float]], rows: Sequence[Mapping[str, Any]],
                       steps: int, plain: str = "plain56", residual: Sequence[str] = ("resnet20", "resnet56")) -> str:
    """The README's reading of a ``resnetlab gradients`` run (``summary.json`` + ``gradients.csv``).

    States the deep plain net's init ratio, its spread and peak block after ``steps`` steps, and
    the largest spread among the ``residual`` nets at init and after training.
    """
    spans = block_spans(rows)
    after = f"after {steps} steps"
    span, peak = spans[plain][after]
    res_init = max(spans[m]["init"][0] for m in residual)
    res_after = max(spans[m][after][0] for m in residual)
    return (f"In {plain} the gradient at block 1's output is {ratios[plain]['init']:.3g} times the one at the "
            f"last block at initialisation; {after} its block norms span a factor of {span:.3g}, largest "
            f"at block {peak}, and that shape depends on the seed and the data split. The residual nets' "
            f"block norms span at most a factor of {res_init:.3g} at initialisation and {res_after:.3g} "
            f"{after}.")


def responses_sentence(summary: Mapping[str, Mapping[str, float]], pairs: Sequence[tuple[str, str]]) -> str:
    """Mean response std of each ``(plain, residual)`` pair and their ratio, from
    :func:`resnetlab.analysis.responses.summarize_responses` (model -> mean / median / max std)."""
    parts = []
    for plain, res in pairs:
        p, r = float(summary[plain]["mean"]), float(summary[res]["mean"])
        ratio = f"{p / r:.3g} times" if r > 0 else "no ratio (zero)"
        parts.append(f"{plain}'s layers respond with a mean std of {p:.3g} against {res}'s {r:.3g} ({ratio})")
    return "Mean std over the 3x3 layers: " + "; ".join(parts) + "."


def training_errors_sentence(train_err: Mapping[str, float], epochs: int) -> str:
    """``"Final training errors after 10 epochs: plain20 17.45%, ..."`` (model -> percent)."""
    return (f"Final training errors after {epochs} epochs: "
            + ", ".join(f"{m} {float(e):.2f}%" for m, e in train_err.items()) + ".")


def landscape_sentence(results: Sequence[Mapping[str, Any]], classes: int) -> str:
    """Loss at the trained weights of each net against chance, ``ln(classes)``, from
    :func:`resnetlab.analysis.landscape.roughness_rows` (``model``, ``loss_at_zero``, ``ratio``)."""
    import math

    chance = math.log(classes)
    parts = []
    for r in results:
        where = "at chance level or above" if r["loss_at_zero"] >= 0.9 * chance else "below chance"
        part = f"{r['model']}'s training loss at its weights is {r['loss_at_zero']:.3g} ({where})"
        if r.get("ratio") is not None:
            part += f", Hessian |lambda_min / lambda_max| {r['ratio']:.3g}"
        parts.append(part)
    return f"Chance level is ln {classes} = {chance:.2f}; " + "; ".join(parts) + "."


__all__ = ["CLOSE_POINTS", "block_spans", "compare_training", "gradient_paragraph", "gradient_ratio_sentences",
           "landscape_sentence", "responses_sentence", "training_errors_sentence"]
