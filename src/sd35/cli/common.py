"""What every `sd35` command shares: the consoles, errors as cause + fix, settings from flags, the options
several commands take (defined once here).

Why: a command is a few lines that turn flags into `Settings` (flags win over the environment and `.env`),
call the library and print. Errors we can name (`Sd35Error`, invalid settings) print as one paragraph with
the fix and a non-zero exit code; nothing is written when the input is bad.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from sd35.errors import InputError, Sd35Error

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

_ENV_NAMES = {"hf_hub_cache": "HF_HUB_CACHE", "hf_token": "HF_TOKEN", "hf_hub_offline": "HF_HUB_OFFLINE",
              "hf_endpoint": "HF_ENDPOINT"}

# --- options shared by several commands ------------------------------------------------------------------
Model = Annotated[Optional[str], typer.Option(
    "--model", help="tiny, medium, large, large-turbo, a repo id or a folder [SD35_MODEL]")]
Revision = Annotated[Optional[str], typer.Option("--revision", help="Hub branch, tag or commit [SD35_REVISION]")]
Precision = Annotated[Optional[str], typer.Option("--precision", help="auto | bf16 | fp8-weight | fp8 [SD35_PRECISION]")]
Device = Annotated[Optional[str], typer.Option("--device", help="auto | cpu | cuda | cuda:N [SD35_DEVICE]")]
T5 = Annotated[Optional[str], typer.Option("--t5", help="auto | bf16 | fp8-weight | off [SD35_T5]")]
Compile = Annotated[Optional[str], typer.Option(
    "--compile", help="off | blocks | full | auto (auto: blocks for `serve` on CUDA, compiled during the warm-up; "
    "off for one-off runs) [SD35_COMPILE]")]
Transformer = Annotated[Optional[Path], typer.Option(
    "--transformer", help="transformer from one SAI/ComfyUI .safetensors file, plain or FP8 scaled [SD35_TRANSFORMER]")]
Lora = Annotated[Optional[list[str]], typer.Option(
    "--lora", help="PATH_OR_NAME[:SCALE], repeatable: a LoRA file (diffusers/PEFT, SAI/kohya or ComfyUI layout) or "
    "a name in SD35_LORA_DIR [SD35_LORAS]")]
LoraFuse = Annotated[Optional[bool], typer.Option(
    "--lora-fuse/--no-lora-fuse", help="bake the LoRAs into the bf16 weights before quantizing [SD35_LORA_FUSE]")]
LoraAllowPartial = Annotated[Optional[bool], typer.Option(
    "--lora-allow-partial/--no-lora-allow-partial", help="skip (and record) LoRA keys that do not fit instead of "
    "refusing the file [SD35_LORA_ALLOW_PARTIAL]")]
Json = Annotated[bool, typer.Option("--json", help="print JSON")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="show the libraries' own logs")]


def lora_flags(lora: list[str] | None, fuse: bool | None, allow_partial: bool | None) -> dict:
    """--lora/--lora-fuse/--lora-allow-partial as Settings fields (None: not given)."""
    return {"loras": ",".join(lora) if lora else None, "lora_fuse": fuse, "lora_allow_partial": allow_partial}


def fail(exc: Sd35Error) -> None:
    from rich.markup import escape

    err.print(f"[bold red]error:[/] {escape(exc.cause)}", highlight=False)
    if exc.fix:
        err.print(f"[bold]fix:[/] {escape(exc.fix)}", highlight=False)
    raise typer.Exit(exc.exit_code)


def settings_error(exc) -> InputError:
    """A pydantic ValidationError on settings, as one cause + fix naming the flag and the variable."""
    parts = []
    for e in exc.errors():
        field = str(e["loc"][0]) if e.get("loc") else "?"
        env = _ENV_NAMES.get(field, f"SD35_{field.upper()}")
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{env} / --{field.replace('_', '-')}: {msg} (got {e.get('input')!r})")
    return InputError("invalid setting: " + "; ".join(parts) + ".",
                      "correct the flag, the environment variable or the line in .env (see .env.example).")


def handle_errors(fn):
    """Print our errors as cause + fix with their exit code instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pydantic import ValidationError

        try:
            return fn(*args, **kwargs)
        except Sd35Error as exc:
            fail(exc)
        except ValidationError as exc:
            fail(settings_error(exc))

    return wrapper


def settings(**flags):
    """Settings with these flags on top (None = not given: the environment, `.env` or the default decides)."""
    from sd35.settings import load_settings

    return load_settings(**flags)


def listen_for_debugger(s) -> None:
    """SD35_DEBUGPY: open (or connect out to) the debugger before the model loads, as configured."""
    from sd35.debugging import breakpoints

    breakpoints.listen(s.debugpy, wait=s.debugpy_wait, allow_remote=s.debugpy_allow_remote,
                       allow_listen=s.debugpy_allow_listen)
