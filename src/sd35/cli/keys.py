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
    daily_images: Optional[int] = typer.Option(None, "--daily-images", help="images per UTC day (default: no "
                                               "quota)"),
    priority: str = typer.Option("interactive", "--priority", help="interactive (people at the page) or batch "
                                 "(scripts: behind interactive work, never starved)"),
) -> None:
    """Create a key for NAME: append its salted hash to the keys file and print the key once."""
    from sd35.service import auth, quotas

    quotas.check_priority(priority)
    quotas.check_daily(daily_images)
    path = file or settings().api_keys_file or auth.DEFAULT_FILE
    key = auth.add(Path(path), name, group)
    if daily_images is not None or priority != "interactive":
        quotas.set_policy(Path(path), name, priority=priority, daily_images=daily_images)
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
        err.print(f"keys of an older format (no id, or scrypt): {', '.join(auth.legacy_names(entries))}; {auth.LEGACY_FIX}.",
                  highlight=False)


@app.command("set")
@handle_errors
def keys_set(
    name: str = typer.Argument(..., help="the key's name"),
    daily_images: Optional[int] = typer.Option(None, "--daily-images", help="images per UTC day"),
    no_quota: bool = typer.Option(False, "--no-quota", help="remove the daily quota"),
    priority: Optional[str] = typer.Option(None, "--priority", help="interactive or batch"),
    file: Optional[Path] = typer.Option(None, "--file", help="[SD35_API_KEYS_FILE, default /etc/sd35/api-keys]"),
) -> None:
    """Change NAME's daily image quota or priority (the key itself stays the same)."""
    from sd35.service import auth, quotas

    if daily_images is None and priority is None and not no_quota:
        raise InputError("nothing to change.", "give --daily-images N, --no-quota or --priority interactive|batch.")
    path = Path(file or settings().api_keys_file or auth.DEFAULT_FILE)
    if not path.exists():
        raise InputError(f"{path} does not exist.", "create it with `sd35 keys add NAME`.")
    policy = quotas.set_policy(path, name, priority=priority, daily_images=daily_images, clear_daily=no_quota)
    quota = "no quota" if policy.daily_images is None else f"{policy.daily_images} images a day"
    err.print(f"{name}: {policy.priority}, {quota}. Restart the service to apply it.", highlight=False)


@app.command("usage")
@handle_errors
def keys_usage(as_json: bool = typer.Option(False, "--json", help="print the usage as JSON")) -> None:
    """Images and GPU-seconds per key: today (UTC) and over the last 7 days (SD35_STATE_DIR/usage.json)."""
    import json

    from sd35.service import quotas

    ledger = quotas.Ledger(quotas.state_dir(settings()))
    if not ledger.path.exists():
        raise InputError(f"no usage recorded in {ledger.path} yet.", "point SD35_STATE_DIR at the service's state "
                         "directory (the unit's: /var/lib/sd35), or generate something first.")
    rows = ledger.summary()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'key':<20} {'images today':>12} {'GPU-s today':>12} {'images 7d':>10} {'GPU-s 7d':>10}")
    for key, row in rows.items():
        print(f"{key:<20} {row['today']['images']:>12} {row['today']['gpu_seconds']:>12.1f} "
              f"{row['7d']['images']:>10} {row['7d']['gpu_seconds']:>10.1f}")
