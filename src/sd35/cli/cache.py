"""`sd35 cache`: the team's shared Hugging Face cache — init, prefetch, quantize (the FP8 store), verify, ls."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sd35.cli.common import Json, Model, Revision, err, handle_errors, out, settings
from sd35.errors import InputError

app = typer.Typer(help="The (shared) Hugging Face cache: init, prefetch, quantize, verify, ls.", no_args_is_help=True)


@app.command("init")
@handle_errors
def cache_init(
    path: Path = typer.Argument(..., help="the folder to share, e.g. /srv/cache/huggingface"),
    group: Optional[str] = typer.Option(None, "--group", help="the team's group (owns the folder)"),
) -> None:
    """Create a group-owned, setgid (2775) cache folder and print the environment lines to use."""
    from sd35.ops import cache

    r = cache.init(path, group)
    err.print(f"{r.path}: group {r.group}, mode 2775 (setgid: new files inherit the group); {r.acl}.",
              highlight=False)
    err.print("Use these lines in /etc/sd35/sd35.env, .env or each user's shell profile. Share only the hub "
              "cache: HF_HOME (with the token) stays per user.", highlight=False)
    for line in r.env_lines:
        print(line)
    print("umask 0002  # without default ACLs, for every session: pam_umask + UMASK 002 in /etc/login.defs "
          "(~/.profile does not reach VS Code; docs/remote-ssh.md); systemd units: UMask=0002")


@app.command("prefetch")
@handle_errors
def cache_prefetch(
    model: str = typer.Argument(..., help="medium, large, large-turbo or a repo id"),
    revision: Revision = None,
    t5: Optional[str] = typer.Option(None, "--t5", help="off: skip the T5 encoder's 9.5 GB [SD35_T5]"),
) -> None:
    """Download only the files the pipeline loads into HF_HUB_CACHE (no single-file or fp32 duplicates)."""
    from sd35 import logs
    from sd35.models import expand_alias
    from sd35.weights import hub
    from sd35.weights.folder import check_complete

    logs.configure(False)
    s = settings(model=model, revision=revision, t5=t5)
    repo = expand_alias(s.model)
    if hub.classify(repo) != "hub":
        raise InputError(f"{repo!r} is not a Hub repo: nothing to prefetch.", "pass medium, large, large-turbo or "
                         "org/name.")
    folder, commit = hub.download(repo, s, with_t5=s.t5 != "off", progress=True)
    check_complete(folder, with_t5=s.t5 != "off")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    err.print(f"{repo} at commit {commit}: {size / 1e9:.2f} GB in {s.hf_hub_cache}", highlight=False)
    print(folder)


@app.command("quantize")
@handle_errors
def cache_quantize(
    model: Model = None,
    precision: str = typer.Option("fp8-weight", "--precision", help="fp8-weight | fp8 (same bytes on disk; the "
                                  "mode a load uses is still chosen at load time)"),
    t5: str = typer.Option("auto", "--t5", help="auto (FP8) | fp8-weight | bf16 (stored as in the source)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="output folder (default: SD35_QUANTIZED_DIR/<name>-"
                                           "<precision>, inside HF_HUB_CACHE)"),
    revision: Revision = None,
) -> None:
    """Write a pre-quantized FP8 copy of a model (transformer + T5 as FP8 data + scales) that loads with
    no bf16 copy in host or GPU memory; the team loads it with --model <name> or its path."""
    from sd35 import logs
    from sd35.weights import hub, store

    logs.configure(False)
    s = settings(model=model, revision=revision)
    target = store.check_request(s, precision, t5, out_dir)  # refuse before downloading or reading
    source = hub.resolve(s, with_t5=True)
    folder = store.quantize(s, source, precision, t5, target)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    err.print(f"{s.model} → {folder} ({precision}, {size / 1e9:.2f} GB); load it with "
              f"--model {folder.name if folder.parent == store.store_dir(s) else folder}", highlight=False)
    print(folder)


@app.command("verify")
@handle_errors
def cache_verify(model: Optional[str] = typer.Argument(None, help="one model (default: the whole cache)")) -> None:
    """Find LFS pointer stubs, truncated or missing files and blobs/locks the group cannot write."""
    from rich.markup import escape

    from sd35.ops import cache

    s = settings()
    problems = cache.verify(s.hf_hub_cache, model) + cache.verify_quantized(s, model)
    for p in problems:
        err.print(f"[bold red]{p.kind}[/]: {escape(str(p.path))}: {escape(p.detail)}\n  fix: {escape(p.fix)}",
                  highlight=False)
    if problems:
        err.print(f"{len(problems)} problem(s) in {s.hf_hub_cache}", highlight=False)
        raise typer.Exit(1)
    err.print(f"{s.hf_hub_cache}: no problems found", highlight=False)


@app.command("ls")
@handle_errors
def cache_ls(as_json: Json = False) -> None:
    """Models in HF_HUB_CACHE: revisions, refs, sizes; and the pre-quantized store."""
    from rich.table import Table

    from sd35.ops import cache
    from sd35.weights import store

    s = settings()
    rows = cache.listing(s.hf_hub_cache)
    stored = store.listing(s)
    if as_json:
        print(json.dumps(rows + [{"repo_id": r["name"], "type": "sd35-quantized", **r} for r in stored], indent=2))
        return
    table = Table(title=f"HF_HUB_CACHE={s.hf_hub_cache}")
    for col in ("repo", "commit", "refs", "files", "size"):
        table.add_column(col, justify="right" if col in ("files", "size") else "left", overflow="fold")
    for r in rows:
        table.add_row(r["repo_id"], r["commit"][:12], ",".join(r["refs"]), str(r["files"]),
                      f"{r['size_on_disk'] / 1e9:.2f} GB")
    out.print(table if rows else f"no models in {s.hf_hub_cache}")
    if stored:
        q = Table(title=f"pre-quantized: {store.store_dir(s)} (load with --model NAME)")
        for col in ("name", "precision", "t5", "source", "size"):
            q.add_column(col, justify="right" if col == "size" else "left", overflow="fold")
        for r in stored:
            src = r["source"]
            q.add_row(r["name"], str(r.get("precision") or r.get("error")), str(r.get("t5")),
                      f"{src.get('repo_id') or src.get('requested')}@{(src.get('commit') or '-')[:12]}",
                      f"{r['size_on_disk'] / 1e9:.2f} GB")
        out.print(q)
