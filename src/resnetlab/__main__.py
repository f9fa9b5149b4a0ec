"""``python -m resnetlab`` (and ``torchrun -m resnetlab``) = the ``resnetlab`` command."""

from resnetlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
