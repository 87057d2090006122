"""`python -m sdtrain` entry point."""

from sdtrain.cli.main import run

run()
