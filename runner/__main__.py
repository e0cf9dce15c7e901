"""`python -m runner` runs the edarun CLI."""

from .cli import main

main()
