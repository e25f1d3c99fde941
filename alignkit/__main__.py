"""`python -m alignkit …` is the `alignkit` command."""

from alignkit.cli.main import main

main()
