"""`python -m classforge`: the command line."""

from classforge.cli import run

run()
