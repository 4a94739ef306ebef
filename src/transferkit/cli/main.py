"""The console-script entry point. Importing this module imports every command module, so all their decorators have registered on `app` before `main()` runs it."""

from __future__ import annotations

import sys

# Importing a command module registers its commands; `transferkit --help` lists them in this order.
# isort: off
from transferkit.cli import stages  # noqa: F401
from transferkit.cli import pipeline  # noqa: F401
from transferkit.cli import serving  # noqa: F401
from transferkit.cli import inputs  # noqa: F401

# isort: on
from transferkit.cli.apps import app


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
