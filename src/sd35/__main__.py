"""`python -m sd35` is the `sd35` command."""

from .cli import main

main()
