"""``python -m resnetlab.models [PATH]``: recount every registered model and write the shipped
``models/catalog.json`` (or PATH), which ``resnetlab models`` and ``info`` read without torch."""

import sys

from resnetlab.models.summary import write_catalog

print(f"wrote {write_catalog(sys.argv[1] if len(sys.argv) > 1 else None)}")
