"""Logging: our messages on stderr, the libraries' import-time chatter silenced.

Why: torchao logs a warning for each CUDA-only extension it cannot load on a CPU machine, diffusers
and transformers print deprecation notes and progress bars for every component. On a first run these
bury the one line that matters (the precision `auto` chose and why). `--verbose` brings them back.
"""

from __future__ import annotations

import logging
import os

NOISY = ("torchao", "torch.utils._pytree", "diffusers", "transformers", "huggingface_hub", "accelerate")


def configure(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger("sd35")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level)
    quiet(not verbose)


def quiet(on: bool = True) -> None:
    """Silence (or restore) the libraries' warnings and per-component progress bars."""
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR if on else logging.WARNING)
    if on:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
