"""Errors a user can act on.

Why a class of our own: every failure we can foresee (a gated repo, offline without a cache, an LFS
pointer instead of weights, a bad flag) must reach the user as one short paragraph that names the
cause and the fix, never as a traceback. Code raises `Sd35Error(cause, fix)`; the CLI prints
"error: … / fix: …" and exits with the class's `exit_code`:
  2  InputError (a flag, a setting, a request field), ModelError (missing, gated, offline, LFS stubs,
     disk), HardwareError (e.g. fp8 on a GPU without FP8 tensor cores) — the run was refused as asked;
  1  a plain Sd35Error (the environment failed us, e.g. cannot set up a folder), and `sd35 doctor` with a
     failing check;
  130 interrupted (Ctrl-C).
The service turns an InputError into a 400 naming `param`.
"""

from __future__ import annotations


class Sd35Error(Exception):
    """A failure with a known cause and a fix the user can apply."""

    exit_code = 1

    def __init__(self, cause: str, fix: str | None = None, *, param: str | None = None):
        super().__init__(cause)
        self.cause = cause
        self.fix = fix
        self.param = param  # the request field at fault, for API error bodies

    def __str__(self) -> str:
        return f"{self.cause}\nFix: {self.fix}" if self.fix else self.cause


class InputError(Sd35Error):
    """The request itself is wrong (a flag, a size, a seed): exit code 2, nothing written."""

    exit_code = 2


class ModelError(Sd35Error):
    """The model cannot be found or loaded as asked (missing, gated, offline, LFS stubs, disk)."""

    exit_code = 2


class NonFiniteOutput(Sd35Error):
    """The decoded image holds NaN/Inf (saved, it would be all black): exit code 3, nothing written unless
    asked (--keep-nonfinite)."""

    exit_code = 3


class HardwareError(Sd35Error):
    """The machine cannot do what was asked (FP8 compute on a GPU without FP8 tensor cores)."""

    exit_code = 2
