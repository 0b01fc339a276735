"""`python -m classforge.cli`: the command line."""

from classforge.cli import main

main()
