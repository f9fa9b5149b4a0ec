"""Old import path of :mod:`resnetlab.checkpoint` (the checkpoint format, now a leaf module).

``from resnetlab.engine import checkpoint`` keeps working and gives the very same module object,
so a test's ``monkeypatch.setattr(ckpt, ...)`` still reaches the code that saves. New code
imports :mod:`resnetlab.checkpoint`: this path also loads the training engine.
"""

import sys

from resnetlab import checkpoint as _leaf
from resnetlab.checkpoint import *  # noqa: F403  the names, for readers and type checkers

sys.modules[__name__] = _leaf
