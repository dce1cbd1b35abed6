"""One settings object for the CLI, the service and the notebooks.

Why one object: every entry point must resolve the same knobs the same way, so a notebook and
`sd35 generate` given the same `.env` load the same model in the same precision.

Precedence (highest first): CLI flag > environment variable > `.env` file > default. CLI flags are
passed as keyword arguments to `Settings(...)`; pydantic-settings ranks those above the environment,
and the environment above the dotenv file (the python-dotenv convention).

The Hugging Face variables keep their upstream names (`HF_HUB_CACHE`, `HF_TOKEN`, `HF_HUB_OFFLINE`,
`HF_ENDPOINT`) so a machine configured for `huggingface_hub` works unchanged. We read them here and
pass them explicitly to `huggingface_hub` calls: the library reads its own variables once, at import
time, and would never see values that only live in `.env`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Precision = Literal["auto", "bf16", "fp8-weight", "fp8"]
T5Mode = Literal["auto", "bf16", "fp8-weight", "off"]
Offload = Literal["none", "model", "sequential"]

PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp8-weight", "fp8")
T5_MODES: tuple[str, ...] = ("auto", "bf16", "fp8-weight", "off")
OFFLOADS: tuple[str, ...] = ("none", "model", "sequential")


def _default_hub_cache() -> str:
    # The same default huggingface_hub uses, so an existing per-user cache is found.
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return os.path.join(hf_home, "hub")


def _default_sd35_cache() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sd35")


def default_compile_cache() -> str:
    """This account's own compiled-kernel cache (SD35_COMPILE_CACHE unset): never a shared folder."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sd35-compile")


class Settings(BaseSettings):
    """Every knob of the workspace; `.env.example` documents each one."""

    model_config = SettingsConfigDict(
        env_prefix="SD35_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    model: str = Field(
        default="tiny",
        description="tiny, medium, large, large-turbo (sd35.models), a Hub repo id (org/name) or a local diffusers folder.",
    )
    revision: str | None = Field(
        default=None,
        description="Hub revision (branch, tag or commit) to load; default: the model's pinned revision or main.",
    )
    precision: Precision = Field(default="auto", description="Transformer precision mode.")
    t5: T5Mode = Field(default="auto", description="T5-XXL text encoder: bf16, fp8-weight, off, or auto.")
    fp8_emulate: bool = Field(default=False, description="Run precision fp8 on a CPU through torch's CPU float8 "
                              "matmul (numerics only, slow; records say emulated). auto never picks it.")
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N.")
    offload: Offload = Field(default="none", description="accelerate CPU offload for small GPUs.")
    output_dir: Path = Field(default=Path("outputs"), description="Where images and sidecars are written.")
    compile: Literal["auto", "off", "blocks", "full"] = Field(
        default="auto", description="torch.compile of the MMDiT: off | blocks | full | auto (blocks for serve on "
        "CUDA, else off); always off while debugging.")
    compile_cache: Path | None = Field(
        default=None, description="Compiled-kernel cache kept across restarts (inductor imports code from it: it "
        "must be writable by this account alone); default ~/.cache/sd35-compile, created 0700.")
    allow_pickle_weights: bool = Field(
        default=False, description="Also load .bin/.pt (pickle) weights when a folder has no .safetensors; "
        "unpickling runs code from whoever wrote the file.")
    quantized_dir: Path | None = Field(
        default=None,
        description="Where `sd35 cache quantize` writes and `--model NAME` finds pre-quantized folders; "
                    "default: sd35-quantized inside HF_HUB_CACHE.",
    )
    lpips_weights: Path | None = Field(
        default=None, description="AlexNet-LPIPS weights for `sd35 bench report` (a torchvision AlexNet checkpoint or "
        "a full LPIPS state dict); default: the torch hub cache, then sd35-lpips inside HF_HUB_CACHE.")
    lean_load: bool = Field(
        default=True,
        description="Quantize the transformer/T5 of a bf16 source as its shards are read (host RAM: one FP8 "
                    "component, not the bf16 pipeline); 0 = load all in bf16, then quantize.",
    )
    transformer: Path | None = Field(
        default=None,
        description="Take the transformer from this single .safetensors file (SAI/ComfyUI checkpoint, plain or "
                    "FP8 scaled); the other components come from the file or from SD35_MODEL.",
    )
    # --- LoRAs (docs/lora.md) ---
    loras: str = Field(default="", description="LoRAs for every run, comma-separated PATH_OR_NAME[:SCALE] (a name "
                       "is a file in SD35_LORA_DIR); the service's default when a request names none.")
    lora_dir: Path | None = Field(default=None, description="The folder of .safetensors LoRAs the service offers "
                                  "(GET /v1/loras; a request's `lora` names files here only).")
    lora_max_rank: int = Field(default=64, ge=1, le=1024, description="Rank of the hot-swap LoRA slots (serving, "
                               "compiled): LoRAs up to it switch per request without a recompile.")
    lora_fuse: bool = Field(default=False, description="Bake SD35_LORAS into the bf16 weights before quantizing "
                            "(no side-path cost; fixed for the process, not switchable per request).")
    lora_allow_partial: bool = Field(default=False, description="Apply the LoRA layers that fit and skip (and "
                                     "record) text-encoder and unknown keys instead of refusing the file.")
    cache_dir: Path = Field(
        default_factory=lambda: Path(_default_sd35_cache()),
        description="Where the embedded tiny model is built (not the Hugging Face cache).",
    )

    # --- debugging (docs/debugging.md) ---
    breaks: str = Field(default="", validation_alias=AliasChoices("SD35_BREAK", "breaks"),
                        description="Stop inside diffusers at TARGET@STEP, e.g. block.12@5,scheduler@5.")
    debugpy: str | None = Field(default=None, description="[connect:|listen:]HOST:PORT: connect to VS Code's "
                                "listening debugger before the model loads (listen: opt-in only).")
    debugpy_wait: bool = Field(default=False, description="Wait for the debugger client before loading.")
    debugpy_allow_remote: bool = Field(default=False, description="Allow debugpy on a non-loopback address.")
    debugpy_allow_listen: bool = Field(default=False, description="Allow SD35_DEBUGPY=listen:… (a port any local "
                                       "account can drive).")

    # --- the service (`sd35 serve`) ---
    host: str = Field(default="127.0.0.1", description="Address the API binds; non-loopback needs an API key.")
    port: int = Field(default=8000, ge=1, le=65535)
    api_key: SecretStr | None = Field(default=None, description="Bearer token every endpoint but /healthz requires "
                                      "(the key named \"default\" in the access log).")
    api_keys_file: Path | None = Field(default=None, description="Per-user keys (NAME:ID:hash lines, "
                                       "`sd35 keys add NAME`); default /etc/sd35/api-keys when it exists.")
    allow_no_key: bool = Field(default=False, description="Explicitly allow serving without a key on a non-loopback "
                               "bind or a host other accounts can log in to.")
    queue_size: int = Field(default=4, ge=1, le=1024, description="Requests waiting for the GPU before 429.")
    queue_per_key: int = Field(default=0, ge=0, le=1024, description="Requests one API key may have waiting "
                               "before that key alone gets 429; 0 = SD35_QUEUE_SIZE.")
    batch_window_ms: int = Field(default=0, ge=0, le=10_000, description="Milliseconds a job waits for "
                                 "compatible jobs (same size, steps, guidance, LoRAs) to share its batch, up to "
                                 "SD35_MAX_IMAGES images; 0 = off.")
    keep_alive: str = Field(default="forever", description="Idle time before the model is released from memory: "
                            "90s, 30m, 2h, 0 (after every job) or forever.")
    state_dir: Path | None = Field(default=None, description="Where the service keeps per-key usage (quotas); "
                                   "default ~/.local/state/sd35 (the unit: /var/lib/sd35).")
    request_timeout: float = Field(default=300.0, gt=0, description="Seconds before a request gets 504.")
    shutdown_grace: float = Field(default=60.0, ge=0, description="Seconds running and queued requests get "
                                  "on SIGTERM, in total.")
    max_pixels: int = Field(default=1536 * 1536, ge=64 * 64, description="Largest width*height served.")
    max_images: int = Field(default=4, ge=1, le=16, description="Images per batch; `n` up to 10 runs in batches.")
    max_steps: int = Field(default=100, ge=1, le=500)
    max_prompt_chars: int = Field(default=32000, ge=1, le=32000, description="Hard cap before the tokenizers.")
    max_body_bytes: int = Field(default=40 * 1024 * 1024, ge=1024, description="Larger request bodies get 413 "
                                "(40 MiB: a 2048² RGBA PNG and its mask, both incompressible, fit).")
    body_timeout: float = Field(default=30.0, gt=0, description="Seconds a client may take to send its body.")
    header_timeout: float = Field(default=15.0, gt=0, description="Seconds a connection may take to send headers.")
    image_url_ttl: float = Field(default=600.0, gt=0, description="Seconds `response_format: url` links last.")
    image_store_bytes: int = Field(default=256 * 1024 * 1024, ge=1024, description="Memory (or disk, with "
                                   "SD35_IMAGE_STORE_DIR) for those images.")
    image_store_dir: Path | None = Field(default=None, description="Keep those images in this directory (shared "
                                         "by every replica) instead of memory; unset: memory.")
    warmup: bool = Field(default=True, description="One 1-step generation after loading, before READY.")
    instances: int | None = Field(default=None, ge=1, le=64, description="Service processes that load at once "
                                  "(doctor's host-RAM check); default: the enabled sd35-api@ units, else 1.")
    load_timeout: float = Field(default=3600.0, gt=0, description="Seconds a load (with its first download) may "
                                "take before systemd is no longer asked to wait.")

    # --- Ray Serve (`make serve-ray`, deploy/ray/serve.yaml, docs/scale-out.md) ---
    ray_replicas: int = Field(default=1, ge=1, le=1024, description="Replicas (one per GPU) Ray Serve starts "
                              "with; the autoscaler never goes below it.")
    ray_max_replicas: int | None = Field(default=None, ge=1, le=1024, description="Autoscaling's upper bound; "
                                         "default SD35_RAY_REPLICAS (a fixed count).")
    ray_target_ongoing: float = Field(default=2.0, gt=0, description="Ongoing requests per replica (running + "
                                      "queued) the autoscaler aims at.")
    ray_cpus: float = Field(default=1.0, gt=0, description="CPU cores Ray reserves for each replica.")

    # --- JupyterLab (`sd35 lab`, `make lab`) ---
    lab_port: int = Field(default=8888, ge=1, le=65535, description="JupyterLab's TCP port (SD35_LAB_TCP=1), "
                          "else the laptop port in the printed ssh -L line.")
    lab_token: SecretStr | None = Field(default=None, description="JupyterLab's token; random if unset.")
    lab_tcp: bool = Field(default=False, description="Listen on 127.0.0.1:SD35_LAB_PORT instead of a Unix socket.")
    lab_socket: Path | None = Field(default=None, description="JupyterLab's Unix socket (default: "
                                    "$XDG_RUNTIME_DIR/sd35-lab.sock, else /tmp/sd35-UID/sd35-lab.sock).")

    hf_hub_cache: Path = Field(
        default_factory=lambda: Path(_default_hub_cache()),
        validation_alias=AliasChoices("HF_HUB_CACHE", "hf_hub_cache"),
    )
    hf_token: SecretStr | None = Field(default=None, validation_alias=AliasChoices("HF_TOKEN", "hf_token"))
    hf_hub_offline: bool = Field(
        default=False, validation_alias=AliasChoices("HF_HUB_OFFLINE", "hf_hub_offline")
    )
    hf_endpoint: str | None = Field(
        default=None, validation_alias=AliasChoices("HF_ENDPOINT", "hf_endpoint")
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        v = value.strip().lower()
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"unknown device {value!r}: use auto, cpu, cuda or cuda:N (e.g. cuda:1)")

    @field_validator("hf_token", "api_key", "lab_token", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value):
        # Secrets are SecretStr: repr, logs, model_dump and the debugger's Variables pane show '**********';
        # readers that really need the value call .get_secret_value().
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        return value.strip() or None if isinstance(value, str) else value

    @field_validator("keep_alive")
    @classmethod
    def _check_keep_alive(cls, value: str) -> str:
        duration_seconds(value)  # raises ValueError naming the accepted forms
        return value.strip().lower()

    @field_validator("api_keys_file", "lab_socket", "lora_dir", "state_dir", mode="before")
    @classmethod
    def _empty_path_is_none(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("debugpy")
    @classmethod
    def _empty_key_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None

    @field_validator("revision", "hf_endpoint")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None


def duration_seconds(text: str) -> float | None:
    """`90s`, `30m`, `2h`, `1d`, `0` (or a bare number of seconds) -> seconds; `forever` -> None."""
    v = str(text).strip().lower()
    if v in ("forever", "-1", "never"):
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (v[:-1], units[v[-1]]) if v and v[-1] in units else (v, 1)
    try:
        seconds = float(number) * unit
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"{text!r} is not a duration: use e.g. 90s, 30m, 2h, 0 (release after every job) "
                         "or forever")
    return seconds


def secret(value: SecretStr | None) -> str | None:
    """The plain value of a secret setting, for the one call that needs it (a header, a Hub request)."""
    return value.get_secret_value() if value is not None else None


def find_env_file() -> str:
    """The `.env` in the working directory or the nearest parent (python-dotenv's `find_dotenv`), so a
    notebook running in notebooks/ reads the workspace's .env like the CLI at the root does."""
    from dotenv import find_dotenv

    return find_dotenv(usecwd=True) or ".env"


def dotenv_values(path: Path | str | None = None) -> dict[str, str]:
    """The variables the workspace's `.env` (or `path`) sets, as Settings reads them (processes that must
    see the same settings elsewhere — Ray replicas — get them from here)."""
    from dotenv import dotenv_values as read

    path = Path(path or find_env_file())
    return {k: v for k, v in read(path).items() if v is not None} if path.is_file() else {}


def dotenv_keys(path: Path | str, include_commented: bool = False) -> list[str]:
    """The keys a dotenv file sets, in order, read by python-dotenv (the parser Settings uses).

    `include_commented` also counts commented-out `# KEY=value` lines: `.env.example` documents optional
    keys that way."""
    import re

    from dotenv import dotenv_values

    path = Path(path)
    if not path.is_file():
        return []
    keys = [k for k in dotenv_values(path) if k]
    if include_commented:
        for line in path.read_text().splitlines():
            m = re.match(r"^#\s*(?:export\s+)?([A-Z_][A-Z0-9_]*)=", line.strip())
            if m and m.group(1) not in keys:
                keys.append(m.group(1))
    return keys


def load_settings(**overrides: object) -> Settings:
    """Build the settings; `overrides` are CLI flags (None means "not given")."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return Settings(_env_file=find_env_file(), **given)
