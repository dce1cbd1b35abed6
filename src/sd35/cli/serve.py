"""`sd35 serve` (the OpenAI-compatible image API) and `sd35 lab` (JupyterLab on a private socket): the two
long-running processes a teammate starts on the shared box."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from sd35.cli.common import (Compile, Model, Precision, Verbose, err, handle_errors, listen_for_debugger,
                                 settings)
from sd35.errors import InputError


@handle_errors
def serve(
    host: Optional[str] = typer.Option(None, "--host", help="bind address [SD35_HOST, default 127.0.0.1]"),
    port: Optional[int] = typer.Option(None, "--port", help="[SD35_PORT, default 8000]"),
    model: Model = None,
    precision: Precision = None,
    compile_mode: Compile = None,
    allow_no_key: Optional[bool] = typer.Option(None, "--allow-no-key", help="serve without any API key even on a "
                                                "non-loopback bind or a host other accounts log in to "
                                                "[SD35_ALLOW_NO_KEY]"),
    verbose: Verbose = False,
) -> None:
    """Serve the OpenAI-compatible image API (one process per GPU; the model is loaded once)."""
    from sd35 import logs
    from sd35.debugging import breakpoints
    from sd35.service.server import serve as run_server

    logs.configure(verbose)
    s = settings(host=host, port=port, model=model, precision=precision, allow_no_key=allow_no_key,
                 compile=compile_mode)
    breakpoints.parse(s.breaks)
    listen_for_debugger(s)
    raise typer.Exit(run_server(s))


@handle_errors
def lab(
    port: Optional[int] = typer.Option(None, "--port", help="TCP port (--tcp), or the laptop port in the printed "
                                       "ssh -L line [SD35_LAB_PORT, default 8888]"),
    root: Optional[Path] = typer.Option(None, "--root", help="folder JupyterLab opens (default: this workspace)"),
    tcp: Optional[bool] = typer.Option(None, "--tcp", help="listen on 127.0.0.1:PORT instead of a private Unix "
                                       "socket (any local account can reach it) [SD35_LAB_TCP]"),
) -> None:
    """JupyterLab on a private Unix socket (0600) by default, rooted at the workspace, kernel = this environment."""
    from sd35.ops import lab as lab_plan
    from sd35.ops.workspace import find_root

    s = settings(lab_port=port, lab_tcp=tcp)
    root = (root or find_root()).expanduser().resolve()
    if not root.is_dir():
        raise InputError(f"--root {root} is not a folder.", "pass the workspace's path.")
    interactive = sys.stderr.isatty()
    plan = lab_plan.plan(s, root, tcp=s.lab_tcp, interactive=interactive)
    where = f"socket {plan.socket} (mode 0600)" if plan.socket else f"http://127.0.0.1:{s.lab_port}"
    err.print(f"JupyterLab on {where}; root {root}; kernel {sys.executable}", highlight=False)
    err.print(f"  from a laptop: {plan.tunnel}   (or your ~/.ssh/config alias for this host)", highlight=False)
    if interactive:
        err.print(f"  then open: {plan.url}", highlight=False)
    else:  # a log, not a person: never the token itself
        err.print(f"  then open http://127.0.0.1:{s.lab_port}/lab?token=… with the token in {plan.token_file} "
                  "(mode 0600)", highlight=False)
    for note in plan.notes:
        err.print(f"warning: {note}", highlight=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, plan.args, plan.env)  # JupyterLab takes over the process (signals, exit code)
