"""`sd35 …` with a NaN planted in one weight: the debuggee of the SD35_BREAK=nan test over DAP.

Run as a program (`python tests/plant_nan.py generate …`): after the model loads, one element of the
weight of PLANT_NAN (default transformer_blocks.2.attn.to_q, needs --precision bf16) becomes NaN, then
the normal CLI runs. Test-only: the product has no way to plant a NaN.
"""

from __future__ import annotations

import os

import sd35.weights.load
from sd35.cli import main

_load = sd35.weights.load.load


def load_with_nan(settings, **kw):
    loaded = _load(settings, **kw)
    module = loaded.pipe.transformer.get_submodule(os.environ.get("PLANT_NAN", "transformer_blocks.2.attn.to_q"))
    with __import__("torch").no_grad():
        module.weight.view(-1)[0] = float("nan")
    return loaded


sd35.weights.load.load = load_with_nan

if __name__ == "__main__":
    main()
