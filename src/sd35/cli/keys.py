"""`sd35 keys`: per-user API keys for `sd35 serve` (salted hashes in SD35_API_KEYS_FILE)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sd35.cli.common import err, handle_errors, settings
from sd35.errors import InputError

app = typer.Typer(help="Per-user API keys for `sd35 serve` (hashed in SD35_API_KEYS_FILE).", no_args_is_help=True)


@app.command("add")
@handle_errors
def keys_add(
    name: str = typer.Argument(..., help="who the key is for (their login): it names them in the access log"),
    file: Optional[Path] = typer.Option(None, "--file", help="[SD35_API_KEYS_FILE, default /etc/sd35/api-keys]"),
    group: Optional[str] = typer.Option(None, "--group", help="group of a new keys file: the service's (sd35), "
                                        "so it can read it"),
) -> None:
    """Create a key for NAME: append its salted hash to the keys file and print the key once."""
    from sd35.service import auth

    path = file or settings().api_keys_file or auth.DEFAULT_FILE
    key = auth.add(Path(path), name, group)
    err.print(f"added {name!r} to {path}; the key is shown once, below (the file keeps only its hash). Restart the "
              "service to load it.", highlight=False)
    print(key)


@app.command("list")
@handle_errors
def keys_list(file: Optional[Path] = typer.Option(None, "--file", help="[SD35_API_KEYS_FILE]")) -> None:
    """The names in the keys file (never a key)."""
    from sd35.service import auth

    path = Path(file or settings().api_keys_file or auth.DEFAULT_FILE)
    if not path.exists():
        raise InputError(f"{path} does not exist.", "create it with `sd35 keys add NAME`.")
    entries = auth.read(path)
    for entry in entries:
        print(entry.name)
    if auth.legacy_names(entries):
        err.print(f"keys of the old format (no id): {', '.join(auth.legacy_names(entries))}; {auth.LEGACY_FIX}.",
                  highlight=False)
