"""`sd35 gpus`: memory in use per GPU and every process on it, with its Unix user and what it is."""

from __future__ import annotations

import json

import typer

from sd35.cli.common import handle_errors


@handle_errors
def gpus(as_json: bool = typer.Option(False, "--json", help="print the GPUs and their processes as JSON")) -> None:
    """Who holds which GPU: memory in use, each process's user, and whether it is an sd35 service instance, a
    lab kernel or something else."""
    from sd35.ops import gpus as survey

    found = survey.survey()
    print(json.dumps(survey.as_dicts(found), indent=2) if as_json else survey.table(found))
