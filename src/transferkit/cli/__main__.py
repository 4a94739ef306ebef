"""`python -m transferkit.cli` is the `transferkit` command."""

from transferkit.cli.main import main

main()
