"""`python -m sd35` is the `sd35` command."""

from sd35.cli import main

main()
