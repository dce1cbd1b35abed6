"""The `sd35` command line: one module per command group, each a few lines per command.

    generate.py  sd35 generate, sd35 fidelity        serve.py   sd35 serve, sd35 lab
    cache.py     sd35 cache init|prefetch|quantize|verify|ls
    bench.py     sd35 bench …                        keys.py    sd35 keys add|set|list|usage
    bench_fp8.py sd35 bench speed|gpu|lora|dynamic   common.py  consoles, errors, shared options
    doctor.py    sd35 doctor                         gpus.py    sd35 gpus
"""

from __future__ import annotations

import sys

import typer

from sd35.cli import bench, cache, doctor, generate, gpus, keys, serve
from sd35.cli.common import err

app = typer.Typer(
    help="Load, generate, serve and benchmark Stable Diffusion 3.5 in bf16 or FP8.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(generate.generate)
app.command()(serve.serve)
app.command()(serve.lab)
app.command()(doctor.doctor)
app.command()(gpus.gpus)
app.command()(generate.fidelity)
app.add_typer(bench.app, name="bench")
app.add_typer(cache.app, name="cache")
app.add_typer(keys.app, name="keys")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted: nothing further was written.")
        sys.exit(130)
