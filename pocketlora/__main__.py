"""`python -m pocketlora` runs the CLI."""

from pocketlora.cli import main

main()
