"""Intercepting a diffusers attention processor without touching diffusers.

Why a proxy object rather than a new processor class: `Attention.forward` reads the processor's
`__call__` signature to decide which keyword arguments to pass, and SD3.5's joint and dual attention
share one processor instance between `attn` and `attn2`. The proxy is installed on one Attention
module only, keeps the joint-processor signature, forwards attribute access to the original, and
hands every call to `intercept(original, args, kwargs)`. Used by the debugger harness (`breakpoints.py`) and
the attention-map capture (`attention.py`).
"""

from __future__ import annotations

from typing import Callable


class ProcessorProxy:
    def __init__(self, original, intercept: Callable):
        self._original = original
        self._intercept = intercept

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        return self._intercept(self._original, (attn, hidden_states, encoder_hidden_states, attention_mask, *args),
                               kwargs)

    def __getattr__(self, name):
        return getattr(self._original, name)


def proxy_processor(attn, intercept: Callable) -> Callable[[], None]:
    """Install a ProcessorProxy on `attn` (an Attention module); returns the function that removes it."""
    original = attn.processor
    attn.processor = ProcessorProxy(original, intercept)

    def undo():
        attn.processor = original

    return undo
