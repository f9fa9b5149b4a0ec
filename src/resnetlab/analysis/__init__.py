"""See why shortcuts work: the degradation experiment, gradient flow, plots, multi-seed results.

- :func:`run_degradation`: plain and residual twins trained with one recipe; Figure 6 and a
  table of final errors (``resnetlab reproduce degradation``).
- :func:`gradient_flow`: gradient norms of every conv weight and block output, at
  initialisation and after K steps (``resnetlab gradients``).
- :func:`plot_runs`: curves of one or more run folders (``resnetlab plot``).
- :func:`train_seeds`: one recipe over several seeds, mean ± std (``resnetlab train --seeds``).
- :func:`run_cifar_table`: the paper's Table 6 on CIFAR-10 (``resnetlab reproduce cifar-table``).
- :func:`resnetlab.analysis.fashion_table.run_fashion_table`: Fashion-MNIST beside the published
  leaderboard (``resnetlab reproduce fashion-table``).

Plots and tables only read run folders (``metrics.jsonl``, ``result.json``), never models.
"""

from __future__ import annotations

from resnetlab.analysis.cifar_table import PAPER_TABLE6, run_cifar_table
from resnetlab.analysis.degradation import run_degradation
from resnetlab.analysis.errors import AnalysisError
from resnetlab.analysis.gradients import gradient_flow
from resnetlab.analysis.plots import plot_degradation, plot_gradients, plot_runs
from resnetlab.analysis.seeds import (
    final_metrics,
    mean_std,
    parse_seeds,
    summarize,
    train_seeds,
)

__all__ = [
    "PAPER_TABLE6", "AnalysisError", "final_metrics", "gradient_flow", "mean_std", "parse_seeds",
    "plot_degradation", "plot_gradients", "plot_runs", "run_cifar_table", "run_degradation",
    "summarize", "train_seeds",
]
