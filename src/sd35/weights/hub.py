"""Where a model's files come from: the embedded tiny model, a local diffusers folder, or the Hub cache.

Why a module of its own: every way a first day goes wrong happens here, before a single weight is
read — a gated repo and a missing or wrong token (401/403), offline mode with nothing cached, a
folder cloned with `git clone` but without Git LFS (pointer files instead of weights), a disk too
small for a 25 GB download. Each ends in a `ModelError` naming the cause and the fix.

Repo ids resolve through the Hugging Face cache (`HF_HUB_CACHE`) with `huggingface_hub`, passing the
token, endpoint and offline flag from our settings explicitly. Only the files the diffusers pipeline
loads are fetched (SD3.5 repos also hold a 16 GB single-file checkpoint and ComfyUI text encoders
that diffusers never reads). The result is always a local folder in diffusers layout, which
`load.py` hands to the same `from_pretrained` call for all three kinds.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from sd35.errors import ModelError
from sd35.weights.folder import check_complete, check_readable
from sd35.models import MODELS, expand_alias, lookup
from sd35.settings import Settings, secret

log = logging.getLogger(__name__)


# The components StableDiffusion3Pipeline loads; T5 is left out when SD35_T5=off.
PIPELINE_FOLDERS = (
    "scheduler",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "transformer",
    "vae",
)
# Weight formats diffusers does not need when safetensors are present, and fp32 duplicates.
IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.gguf",
                   "*fp32*"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local folder, with what is needed to record where it came from."""

    requested: str
    kind: str  # "tiny" | "local" | "hub" | "quantized" (a name in the pre-quantized store)
    path: Path
    repo_id: str | None = None
    revision: str | None = None  # as requested (branch, tag or commit)
    commit: str | None = None  # the commit the snapshot is at
    notice: str | None = None  # printed next to every output (the tiny model's warning)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def allow_patterns(with_t5: bool = True) -> list[str]:
    folders = [f for f in PIPELINE_FOLDERS if with_t5 or f not in ("text_encoder_3", "tokenizer_3")]
    return ["model_index.json"] + [f"{f}/*" for f in folders]


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", "./", "../", "~")) or model.count("/") > 1 or model.endswith("/")


def classify(model: str) -> str:
    """What `model` names, without touching the network: "tiny", "local" (a folder, existing or meant to be),
    "hub" (a repo id or alias) or "invalid". The one place this decision is made."""
    model = expand_alias(model)
    if model == "tiny":
        return "tiny"
    if not model:
        return "invalid"
    if Path(model).expanduser().exists() or _looks_like_path(model):
        return "local"
    return "hub" if _REPO_ID.match(model) else "invalid"


def resolve(settings: Settings, *, with_t5: bool = True) -> ModelSource:
    """Resolve `settings.model` to a local diffusers folder, downloading into the Hub cache if allowed."""
    model = expand_alias(settings.model)
    if not model:
        raise ModelError("no model was given.", "set SD35_MODEL or pass --model (e.g. tiny, medium, large).")
    kind = classify(model)
    if kind == "tiny":
        from sd35.weights import tiny

        path = tiny.ensure(settings.cache_dir)
        return ModelSource(model, "tiny", path, notice=tiny.TINY_NOTICE)
    if kind == "local":
        return check_local(model, with_t5=with_t5)
    stored = _quantized_store(model, settings)
    if stored is not None:  # a name in the pre-quantized store (`sd35 cache quantize`)
        src = check_local(str(stored), with_t5=with_t5)
        return ModelSource(model, "quantized", src.path, notice=src.notice)
    if kind == "invalid":
        raise ModelError(
            f"model {model!r} is neither `tiny`, an existing local folder, nor a Hub repo id (org/name).",
            f"pass --model {', '.join(MODELS)}, a repo id such as {MODELS['medium'].repo_id}, or the path of "
            "a diffusers folder.",
        )
    return _resolve_hub(model, settings, with_t5=with_t5)


def repo_folder(cache: Path, repo_id: str) -> Path:
    return Path(cache) / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(cache: Path, repo_id: str, revision: str | None) -> Path | None:
    """The snapshot folder of `repo_id` at `revision` (branch, tag or commit), if cached."""
    folder = repo_folder(cache, repo_id)
    rev = revision or "main"
    ref = folder / "refs" / rev
    commit = ref.read_text().strip() if ref.is_file() else rev
    snap = folder / "snapshots" / commit
    return snap if snap.is_dir() else None


def find_local(settings: Settings) -> Path | None:
    """The folder already on this machine that holds the configured model's files, if any — without
    building, downloading or contacting anything (the tiny build, a local folder, a cached snapshot)."""
    model = expand_alias(settings.model)
    kind = classify(model)
    if kind == "tiny":
        from sd35.weights import tiny

        folder = tiny.tiny_dir(settings.cache_dir)
        return folder if (folder / "model_index.json").is_file() else None
    if kind == "local":
        p = Path(model).expanduser()
        return p if p.is_dir() else None
    stored = _quantized_store(model, settings)
    if stored is not None:
        return stored
    if kind == "hub":
        return cached_snapshot(Path(settings.hf_hub_cache).expanduser(), model, revision_for(model, settings))
    return None


def _quantized_store(model: str, settings: Settings) -> Path | None:
    """`model` as the name of a pre-quantized folder in the store (store.py), if there is one."""
    from sd35.weights import store

    return store.find(model, settings)


def check_local(requested: str, *, with_t5: bool = True) -> ModelSource:
    """A local diffusers folder, checked (exists, model_index.json, no LFS stubs, components present)."""
    path = Path(requested).expanduser()
    if not path.exists():
        raise ModelError(
            f"local model folder {str(path)!r} does not exist.",
            f"check the path, or pass a Hub repo id (e.g. {MODELS['medium'].repo_id}) or `tiny`.",
        )
    if not path.is_dir() or not (path / "model_index.json").is_file():
        raise ModelError(
            f"{str(path)!r} is not a diffusers pipeline folder (no model_index.json).",
            "point --model at the folder that holds model_index.json, transformer/, vae/ … "
            "(single-file .safetensors checkpoints are not supported: use the diffusers layout).",
        )
    check_complete(path, with_t5=with_t5)
    check_readable(path)
    return ModelSource(requested, "local", path.resolve(), notice=_store_notice(path))


def _store_notice(folder: Path) -> str | None:
    """A pre-quantized store made from the tiny model keeps the tiny model's notice (its images are not
    SD3.5's either); the store's record says what its source was."""
    from sd35.weights import store

    try:
        record = store.read_record(folder)
    except ModelError:
        return None  # load.py reports the bad record
    if record and record.get("source", {}).get("kind") == "tiny":
        from sd35.weights import tiny

        return tiny.TINY_NOTICE
    return None


def hub_error(exc: Exception, repo_id: str, settings: Settings) -> ModelError:
    """Map huggingface_hub's exceptions to a cause and a fix."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"https://huggingface.co/{repo_id}"
    has_token = bool(settings.hf_token) or _stored_token_present()
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError):
        if has_token:
            return ModelError(
                f"{repo_id} is a gated repo and your token has no access to it ({status}).",
                f"accept the license at {page} with the account that owns the token; a fine-grained token "
                "also needs 'Read access to contents of all public gated repos you can access'.",
            )
        return ModelError(
            f"{repo_id} is a gated repo and no Hugging Face token was sent ({status}).",
            f"accept the license at {page}, create a read token at https://huggingface.co/settings/tokens "
            "and set HF_TOKEN in .env (or run `hf auth login`).",
        )
    if isinstance(exc, RevisionNotFoundError):
        return ModelError(
            f"revision {settings.revision!r} does not exist in {repo_id}.",
            "set SD35_REVISION to a branch, tag or commit of the repo (or unset it for main).",
        )
    if isinstance(exc, RepositoryNotFoundError):
        return ModelError(
            f"{repo_id} was not found on the Hub, or it is private/gated and "
            + ("your token has no access" if has_token else "no token was sent")
            + f" ({status}).",
            "check the repo id; for a gated repo accept its license on the model page and set HF_TOKEN.",
        )
    if isinstance(exc, HfHubHTTPError) and status == 401:
        return ModelError(
            f"the Hub rejected the Hugging Face token (401) for {repo_id}: it is invalid or expired.",
            "create a new read token at https://huggingface.co/settings/tokens and set HF_TOKEN.",
        )
    if isinstance(exc, HfHubHTTPError) and status == 403:
        return ModelError(
            f"the token is valid but not allowed to read {repo_id} (403).",
            f"accept the license at {page}; with a fine-grained token, allow access to public gated repos.",
        )
    if isinstance(exc, LocalEntryNotFoundError):
        rev = settings.revision or "main"
        if settings.hf_hub_offline:
            return ModelError(
                f"{repo_id} at revision {rev} is not in the Hugging Face cache ({settings.hf_hub_cache}) "
                "and offline mode is on (HF_HUB_OFFLINE=1).",
                f"download it once with network access: `HF_HUB_OFFLINE=0 sd35 cache prefetch {repo_id}`, "
                "or point HF_HUB_CACHE at the shared cache that has it.",
            )
        return ModelError(
            f"{repo_id} at revision {rev} is not (completely) in the Hugging Face cache "
            f"({settings.hf_hub_cache}) and the Hub could not be reached.",
            "check the network (or HF_ENDPOINT), or point HF_HUB_CACHE at a cache that has the model.",
        )
    if isinstance(exc, HfHubHTTPError):
        return ModelError(f"the Hub answered {status} for {repo_id}: {exc}.", "try again later.")
    return ModelError(f"could not fetch {repo_id}: {type(exc).__name__}: {exc}.", "check the network and try again.")


def _stored_token_present() -> bool:
    try:
        from huggingface_hub import get_token

        return get_token() is not None
    except Exception:  # noqa: BLE001 - a broken token file is "no token" here
        return False


def _missing_bytes(api, repo_id: str, commit: str, patterns: list[str], cache: Path) -> int:
    """Bytes still to download for the files the pipeline loads at `commit`."""
    from huggingface_hub.constants import REPO_ID_SEPARATOR
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    snapshot = cache / f"models{REPO_ID_SEPARATOR}{repo_id.replace('/', REPO_ID_SEPARATOR)}" / "snapshots" / commit
    files = [f for f in api.list_repo_tree(repo_id, revision=commit, recursive=True) if isinstance(f, RepoFile)]
    wanted = set(filter_repo_objects([f.path for f in files], allow_patterns=patterns, ignore_patterns=IGNORE_PATTERNS))
    return sum((f.size or 0) for f in files if f.path in wanted and not (snapshot / f.path).exists())


def check_disk(cache: Path, needed: int, what: str) -> None:
    probe = cache
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    margin = 1 << 30  # leave 1 GiB so the machine stays usable
    if needed + margin > free:
        raise ModelError(
            f"not enough disk for {what}: {needed / 1e9:.1f} GB to download, {free / 1e9:.1f} GB free "
            f"under {probe} (HF_HUB_CACHE={cache}).",
            "free space there, or set HF_HUB_CACHE to a larger disk (a shared cache: `sd35 cache init`).",
        )


def revision_for(repo_id: str, settings: Settings) -> str | None:
    """SD35_REVISION when set, else the registry's default revision for a known model (None = main)."""
    spec = lookup(repo_id)
    return settings.revision or (spec.revision if spec else None)


def download(repo_id: str, settings: Settings, *, with_t5: bool = True, progress: bool = True) -> tuple[Path, str]:
    """Fetch (or find, offline) the pipeline's files of `repo_id` in the Hub cache; return (folder, commit)."""
    if settings.revision is None and revision_for(repo_id, settings):
        settings = settings.model_copy(update={"revision": revision_for(repo_id, settings)})
    import huggingface_hub
    from huggingface_hub import HfApi, snapshot_download

    cache = Path(settings.hf_hub_cache).expanduser()
    patterns = allow_patterns(with_t5)
    kw = dict(cache_dir=cache, token=secret(settings.hf_token), endpoint=settings.hf_endpoint)
    offline = settings.hf_hub_offline or huggingface_hub.constants.HF_HUB_OFFLINE
    try:
        if offline:
            folder = snapshot_download(
                repo_id, revision=settings.revision, allow_patterns=patterns, ignore_patterns=IGNORE_PATTERNS,
                local_files_only=True, **kw,
            )
        else:
            # 1. Which commit, and may we read it? (401/403/gated surface here, before any download.)
            api = HfApi(endpoint=settings.hf_endpoint, token=secret(settings.hf_token))
            info = api.model_info(repo_id, revision=settings.revision)
            commit = info.sha
            # 2. Is there room for what is not cached yet?
            check_disk(cache, _missing_bytes(api, repo_id, commit, patterns, cache), f"{repo_id}@{commit[:8]}")
            # 3. Download only the pipeline's files, pinned to that commit.
            if not progress:
                huggingface_hub.utils.disable_progress_bars()
            folder = snapshot_download(
                repo_id, revision=commit, allow_patterns=patterns, ignore_patterns=IGNORE_PATTERNS, **kw,
            )
            # 4. Record which commit the branch/tag pointed at, so offline runs find it by that name too.
            _write_ref(Path(folder).parent.parent, settings.revision or "main", commit)
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - every Hub failure becomes a cause + fix
        from huggingface_hub.errors import HfHubHTTPError

        if offline or isinstance(exc, HfHubHTTPError):
            raise hub_error(exc, repo_id, settings) from None
        # No answer at all (DNS, refused, timeout): use the cached copy if there is one, as huggingface_hub does.
        try:
            folder = snapshot_download(repo_id, revision=settings.revision, allow_patterns=patterns,
                                       ignore_patterns=IGNORE_PATTERNS, local_files_only=True, **kw)
        except Exception:  # noqa: BLE001
            raise ModelError(
                f"the Hub ({settings.hf_endpoint or 'https://huggingface.co'}) could not be reached "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no answer'}) and {repo_id} "
                f"at revision {settings.revision or 'main'} is not in HF_HUB_CACHE={cache}.",
                "connect to the network (or set HF_ENDPOINT to a mirror), or download it on a machine with access "
                f"(`sd35 cache prefetch {repo_id}`), copy the cache here and set HF_HUB_OFFLINE=1.",
            ) from None
        log.warning("the Hub could not be reached (%s); using the cached %s", type(exc).__name__, repo_id)
    folder = Path(folder)
    return folder, folder.name


def _write_ref(repo_dir: Path, revision: str, commit: str) -> None:
    if revision == commit:
        return
    ref = repo_dir / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    if ref.is_file() and ref.read_text().strip() == commit:
        return
    tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, ref)


def _resolve_hub(repo_id: str, settings: Settings, *, with_t5: bool) -> ModelSource:
    folder, commit = download(repo_id, settings, with_t5=with_t5)
    check_complete(folder, with_t5=with_t5)
    return ModelSource(repo_id, "hub", folder, repo_id=repo_id, revision=revision_for(repo_id, settings) or "main",
                       commit=commit)
