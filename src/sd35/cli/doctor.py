"""`sd35 doctor`: every known first-day pitfall of this machine, each with its fix (exit 1 on a fail)."""

from __future__ import annotations

import json

import typer

from sd35.cli.common import Model, Precision, out, settings, settings_error


def doctor(
    as_json: bool = typer.Option(False, "--json", help="print the checks as a JSON list"),
    model: Model = None,
    precision: Precision = None,
) -> None:
    """Check this machine for every known onboarding pitfall; exit 1 if any check fails."""
    from pydantic import ValidationError

    from sd35 import logs
    from sd35.ops import doctor as doc
    from sd35.ops.workspace import find_root
    from sd35.settings import Settings

    logs.configure(False)
    try:  # a bad setting is one of the findings, not a reason to stop
        s, problem = settings(model=model, precision=precision), None
    except ValidationError as exc:
        s, problem = Settings.model_construct(), settings_error(exc).cause
    results = doc.run(doc.Context(settings=s, settings_error=problem, root=find_root()))
    if as_json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        out.print(doc.table(results))
    if any(r.status == doc.FAIL for r in results):
        raise typer.Exit(1)
