"""``python -m ssmkit ...`` is the ``ssmkit`` command (works under torchrun too)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
