"""Doctor checks of the configured weights: the model (tiny, a folder, the FP8 store, a cached Hub
snapshot) and the optional single-file transformer (SD35_TRANSFORMER).

Why together: both answer "are the weights sd35 will load there and whole?" from files on disk only
(configs, safetensors headers, LFS pointer stubs), never by loading a model.
"""

from __future__ import annotations

from pathlib import Path

from sd35.ops.doctor.context import FAIL, OK, SKIP, WARN, Check, Context


def check_transformer_file(ctx: Context) -> Check:
    """SD35_TRANSFORMER: what the file is (read from its header), and whether it fits the model's folder."""
    from sd35.errors import ModelError
    from sd35.weights.singlefile import check_matches, inspect

    path = getattr(ctx.settings, "transformer", None) if ctx.settings else None
    if not path:
        return Check("transformer file", SKIP, "SD35_TRANSFORMER not set: the transformer comes from the model folder")
    try:
        info = inspect(path)
        folder = ctx.model_folder()
        if folder is not None:
            check_matches(info, folder)
    except ModelError as exc:
        return Check("transformer file", FAIL, exc.cause, exc.fix)
    extra = "" if not info.bundled else " (bundled components are not used: they come from SD35_MODEL)"
    return Check("transformer file", OK, f"{path}: {info.describe()}{extra}")


def check_model(ctx: Context) -> Check:
    from sd35.errors import ModelError
    from sd35.weights.folder import find_lfs_pointers
    from sd35.weights.hub import check_local, find_local, revision_for

    s = ctx.settings
    if ctx.kind == "tiny":
        return Check("model", OK, "tiny (embedded, built locally on first use; random weights)")
    if ctx.kind == "local":
        try:
            check_local(ctx.model, with_t5=s.t5 != "off")
        except ModelError as exc:
            return Check("model", FAIL, exc.cause, exc.fix)
        return Check("model", OK, f"local diffusers folder {Path(ctx.model).expanduser()}")
    stored = find_local(s) if ctx.kind == "invalid" else None
    if stored is not None:  # a name in the pre-quantized store
        from sd35.weights.store import read_record

        try:
            rec = read_record(stored) or {}
            check_local(str(stored), with_t5=s.t5 != "off")
        except ModelError as exc:
            return Check("model", FAIL, exc.cause, exc.fix)
        src = rec.get("source", {})
        return Check("model", OK, f"pre-quantized {rec.get('precision')} copy of {src.get('repo_id') or src.get('requested')}"
                     f"@{(src.get('commit') or '-')[:12]} at {stored}")
    if ctx.kind == "invalid":
        return Check("model", FAIL, f"SD35_MODEL={ctx.model!r} is neither tiny, a folder nor a Hub repo id",
                     "use tiny, medium, large, large-turbo, org/name or a folder path")
    snap = find_local(s)
    rev = revision_for(ctx.model, s) or "main"
    if snap is None:
        if s.hf_hub_offline:
            return Check("model", FAIL, f"{ctx.model}@{rev} is not cached and HF_HUB_OFFLINE=1",
                         f"prefetch it with network access: `HF_HUB_OFFLINE=0 sd35 cache prefetch {ctx.model}`")
        return Check("model", WARN, f"{ctx.model}@{rev} not cached yet: the first run downloads it",
                     f"prefetch it once for everyone: `sd35 cache prefetch {ctx.model}`")
    stubs = find_lfs_pointers(snap)
    if stubs:
        return Check("model", FAIL, f"cached {ctx.model} holds LFS pointer stubs ({stubs[0].relative_to(snap)})",
                     "delete the snapshot and download it again with `sd35 cache prefetch`")
    return Check("model", OK, f"{ctx.model}@{rev} cached at commit {snap.name[:12]}")
