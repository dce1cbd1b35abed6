"""Doctor checks of Hugging Face access: a token, and whether it can read the configured repo.

Why together: the SD3.5 repos are gated, so a missing token or an unaccepted license is the first
download's most common failure; both checks share how the token is found (settings, then the Hub's
login). The access check asks the Hub's auth-check endpoint and is skipped offline.
"""

from __future__ import annotations

from sd35.ops.doctor.context import FAIL, OK, SKIP, WARN, Check, Context


def _token(ctx: Context) -> str | None:
    if ctx.settings and ctx.settings.hf_token:
        return ctx.settings.hf_token.get_secret_value()
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001
        return None


def check_token(ctx: Context) -> Check:
    token = _token(ctx)
    gated = ctx.known is not None and ctx.known.gated
    if token:
        return Check("hf token", OK, f"present for this user (hf_…{token[-4:]})")
    if gated:
        return Check("hf token", FAIL, f"no Hugging Face token, and {ctx.model} is gated",
                     f"accept the license at https://huggingface.co/{ctx.model}, create a read token and set "
                     "HF_TOKEN in .env (or run `hf auth login`)")
    return Check("hf token", OK, f"none; not needed for {ctx.model} (the SD3.5 repos need one)")


def check_hub_access(ctx: Context) -> Check:
    if ctx.kind != "hub":
        return Check("hub access", SKIP, f"{ctx.model} is not a Hub repo")
    s = ctx.settings
    if s.hf_hub_offline:
        return Check("hub access", SKIP, f"offline (HF_HUB_OFFLINE=1): access to {ctx.model} not checked; "
                     "the cached copy is used")
    from huggingface_hub import HfApi

    from sd35.weights.hub import hub_error

    token = _token(ctx)
    try:
        HfApi(endpoint=s.hf_endpoint, token=token).auth_check(ctx.model, token=token)
    except Exception as exc:  # noqa: BLE001
        from huggingface_hub.errors import HfHubHTTPError

        if not isinstance(exc, HfHubHTTPError):  # no HTTP answer at all: DNS, refused, timeout
            return Check("hub access", WARN, f"the Hub could not be reached ({type(exc).__name__})",
                         "check the network or HF_ENDPOINT; on an offline server set HF_HUB_OFFLINE=1")
        err = hub_error(exc, ctx.model, s)
        return Check("hub access", FAIL, err.cause, err.fix)
    return Check("hub access", OK, f"{'the token' if token else 'anonymous access'} can read {ctx.model}")
