"""``AnalysisError``, in a module of its own so the analysis submodules need not import the
package ``__init__`` (which imports them: a cycle)."""

from __future__ import annotations

from resnetlab.config import ConfigError


class AnalysisError(ConfigError):
    """Bad input to an analysis command (a folder without metrics, bad ``depths`` or ``seeds``
    value); the message names it. A ConfigError, so the CLI prints it as one line."""


__all__ = ["AnalysisError"]
