"""Doctor checks of the configuration: the settings themselves and the keys in `.env`.

Why together: both answer "did sd35 understand what you asked for?" before any other check trusts the
settings (a bad value is a failed check, never a crash; a typo in `.env` is silently ignored otherwise).
"""

from __future__ import annotations

import difflib

from sd35.ops.doctor.context import FAIL, OK, WARN, Check, Context


def check_settings(ctx: Context) -> Check:
    if ctx.settings_error:
        return Check("settings", FAIL, ctx.settings_error, "correct the value in .env or the environment (see .env.example)")
    s = ctx.settings
    return Check("settings", OK, f"model={s.model} precision={s.precision} t5={s.t5} device={s.device} offload={s.offload}")


def check_dotenv(ctx: Context) -> Check:
    example = ctx.root / ".env.example"
    if not ctx.env_file.is_file():
        return Check(".env", OK, "no .env: defaults and the environment apply",
                     None) if not example.is_file() else Check(
            ".env", OK, "no .env: defaults and the environment apply (cp .env.example .env to configure)")
    from sd35.settings import dotenv_keys as env_keys

    known = set(env_keys(example, include_commented=True))
    unknown = [k for k in env_keys(ctx.env_file) if known and k not in known]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(known), n=1)
            hints.append(f"{k} (did you mean {close[0]}?)" if close else k)
        return Check(".env", WARN, f"unknown key(s) in {ctx.env_file}: {', '.join(hints)} — they are ignored",
                     "rename them to the keys in .env.example")
    return Check(".env", OK, f"{ctx.env_file}: {len(env_keys(ctx.env_file))} known keys")
