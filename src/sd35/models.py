"""The model registry: every fact about the SD3.5 models this workspace knows, in one place.

Why one module: the aliases, the Hub repo ids, the published architectures (transformer, text encoders,
VAE) and the sampling defaults were spread over the loader, the benchmarks, the sizing code and the
tiny model, and they drifted (a local Large-Turbo folder got Large's 28 steps). Everything else asks
here: `hub` resolves aliases, `sizing` and `doctor` size a model from its configs, `bench` builds the
published architectures with random weights, `tiny` builds the embedded model from `TINY_SPEC`, and
the runtime takes its defaults and size limits from `describe_folder`.

Two ways to know a model:
- by name (`lookup`): an alias (`tiny`, `medium`, `large`, `large-turbo`) or a published repo id —
  known before anything is downloaded (doctor, sizing, disk checks);
- by its files (`describe_folder`): a local diffusers folder's own configs. A folder that is not an
  alias — a git clone, a fine-tune, a snapshot in the Hub cache, the tiny build — gets the defaults of
  the family its transformer config matches, its default size from the transformer's `sample_size`
  and the VAE's down-sampling, and its largest size from the position-embedding table. Large and
  Large-Turbo share one architecture, so Turbo is recognised by name (the folder, the Hub cache's repo
  folder, or model_index.json's `_name_or_path`); the reason is recorded either way.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# --- Published architectures (config.json of each component in the Hub repos) --------------------------

# transformer/config.json. Large Turbo shares Large's architecture.
TRANSFORMER_MEDIUM = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "qk_norm": "rms_norm", "dual_attention_layers": list(range(13)),
}
TRANSFORMER_LARGE = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 38,
    "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096,
    "caption_projection_dim": 2432, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
    "qk_norm": "rms_norm", "dual_attention_layers": [],
}
# Text encoders and VAE: identical across Large, Medium and Large Turbo.
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768, "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280, "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "gelu"}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32}
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [128, 256, 512, 512],
       "layers_per_block": 2, "norm_num_groups": 32, "use_quant_conv": False, "use_post_quant_conv": False,
       "scaling_factor": 1.5305, "shift_factor": 0.0609,
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
# scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler), the same in every SD3.5 repo.
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}

# --- The embedded tiny model (built by tiny.py) -------------------------------------------------------

# Everything that defines the tiny model. Changing it changes its folder name (a digest), so a stale build
# is never loaded.
TINY_SPEC: dict = {
    "version": 1,
    "seed": 0,
    "transformer": {
        "sample_size": 16,  # 128 px / VAE factor 8
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 4,
        "attention_head_dim": 16,
        "num_attention_heads": 4,
        "joint_attention_dim": 64,  # = T5 d_model
        "caption_projection_dim": 64,
        "pooled_projection_dim": 64,  # = CLIP-L projection + CLIP-G projection
        "pos_embed_max_size": 96,  # up to 96 patches = 1536 px per side
        "qk_norm": "rms_norm",
        "dual_attention_layers": [0, 1],  # SD3.5 Medium uses dual attention in its first layers
    },
    "clip": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "projection_dim": 32,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
    },
    "t5": {
        "d_model": 64,
        "d_kv": 16,
        "d_ff": 128,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "block_out_channels": [16, 16, 32, 32],  # four blocks: 8x down-sampling, as SD3.5
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "scaling_factor": 1.5305,  # SD3.5's VAE values
        "shift_factor": 0.0609,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    },
    "scheduler": {"num_train_timesteps": 1000, "shift": 3.0},
}

# --- Families: sampling defaults (Stability AI's recommended settings per model card) ------------------


@dataclass(frozen=True)
class Sampling:
    """Steps, guidance and size a model is meant to run with."""

    steps: int
    guidance: float
    height: int
    width: int

    def as_dict(self) -> dict:
        return asdict(self)


FAMILIES: dict[str, Sampling] = {
    "sd3.5-large": Sampling(steps=28, guidance=3.5, height=1024, width=1024),
    "sd3.5-large-turbo": Sampling(steps=4, guidance=0.0, height=1024, width=1024),
    "sd3.5-medium": Sampling(steps=40, guidance=4.5, height=1024, width=1024),
    # A 4-step 128x128 image takes seconds on 2 CPU cores.
    "tiny": Sampling(steps=4, guidance=4.5, height=128, width=128),
    # An SD3-shaped model we do not recognise: SD3's own published defaults.
    "sd3": Sampling(steps=28, guidance=3.5, height=1024, width=1024),
}


@dataclass(frozen=True)
class ModelSpec:
    """A model known by name."""

    alias: str
    repo_id: str | None  # None for the embedded tiny model
    family: str  # key of FAMILIES
    transformer: dict  # the published transformer config
    gated: bool = True
    # Default Hub revision. None = the repo's main branch: the commits of the gated SD3.5 repos could not
    # be read from this workspace's build machines, so none is pinned here. Pin one with SD35_REVISION;
    # the commit actually loaded is recorded in every sidecar.
    revision: str | None = None
    text_encoders: tuple[dict, dict, dict] = (CLIP_L, CLIP_G, T5_XXL)
    vae: dict = field(default_factory=lambda: VAE)

    @property
    def sampling(self) -> Sampling:
        return FAMILIES[self.family]

    @property
    def arch(self) -> str:
        """The architecture's short name (what `sd35 bench --arch` takes)."""
        return {"sd3.5-large-turbo": "large", "sd3.5-large": "large", "sd3.5-medium": "medium"}.get(
            self.family, self.alias)


MODELS: dict[str, ModelSpec] = {
    "tiny": ModelSpec("tiny", None, "tiny", TINY_SPEC["transformer"], gated=False, vae=TINY_SPEC["vae"],
                      text_encoders=(TINY_SPEC["clip"], TINY_SPEC["clip"], TINY_SPEC["t5"])),
    "medium": ModelSpec("medium", "stabilityai/stable-diffusion-3.5-medium", "sd3.5-medium", TRANSFORMER_MEDIUM),
    "large": ModelSpec("large", "stabilityai/stable-diffusion-3.5-large", "sd3.5-large", TRANSFORMER_LARGE),
    "large-turbo": ModelSpec("large-turbo", "stabilityai/stable-diffusion-3.5-large-turbo", "sd3.5-large-turbo",
                             TRANSFORMER_LARGE),
}
# The published transformer architectures by short name (benchmarks build these with random weights).
ARCHS: dict[str, dict] = {"medium": TRANSFORMER_MEDIUM, "large": TRANSFORMER_LARGE, "tiny": TINY_SPEC["transformer"]}
_BY_REPO = {m.repo_id: m for m in MODELS.values() if m.repo_id}


def expand_alias(model: str) -> str:
    """`large`, `medium`, `large-turbo` are short for the published repo ids; anything else is returned
    stripped (`tiny`, a repo id, a path)."""
    key = model.strip()
    spec = MODELS.get(key.lower())
    return spec.repo_id if spec and spec.repo_id else key


def lookup(model: str) -> ModelSpec | None:
    """The known model `model` names (alias or published repo id), if it is one."""
    key = model.strip()
    return MODELS.get(key.lower()) or _BY_REPO.get(key)


# --- Knowing a model from its files ----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know about a loaded (or loadable) model, read from its configs."""

    family: str
    family_reason: str  # how the family was recognised, for logs and sidecars
    sampling: Sampling
    patch_size: int
    vae_scale_factor: int  # pixels per latent cell (8 for SD3.5)
    max_side: int  # largest height/width the position-embedding table covers, in pixels

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.patch_size

    def as_dict(self) -> dict:
        d = asdict(self)
        d["sampling"] = self.sampling.as_dict()
        return d


def _config(folder: Path, component: str) -> dict:
    f = Path(folder) / component / "config.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        return {}


def _matches(cfg: dict, published: dict) -> bool:
    keys = ("num_layers", "num_attention_heads", "attention_head_dim", "caption_projection_dim",
            "pos_embed_max_size", "patch_size")
    return all(cfg.get(k) == published.get(k) for k in keys)


def _name_hints(folder: Path) -> str:
    """Names a folder goes by: its path (a git clone's name, the Hub cache's `models--org--name`) and
    model_index.json's `_name_or_path`, lower-cased."""
    hints = [str(Path(folder).expanduser().resolve()).lower()]
    index = Path(folder) / "model_index.json"
    try:
        hints.append(str(json.loads(index.read_text()).get("_name_or_path", "")).lower())
    except (OSError, ValueError):
        pass
    return " ".join(hints)


# A pre-quantized folder's record (written by weights/store.py); it names the model the folder was made from.
QUANT_RECORD = "sd35_quant.json"


def _quantized_from(folder: Path) -> ModelSpec | None:
    """The known model a pre-quantized folder was made from, per its record."""
    try:
        src = json.loads((Path(folder) / QUANT_RECORD).read_text()).get("source", {})
    except (OSError, ValueError, AttributeError):
        return None
    return lookup(src.get("alias") or "") or lookup(src.get("repo_id") or "")


def family_of(folder: Path, requested: str | None = None) -> tuple[str, str]:
    """(family, reason) of the model in `folder`; `requested` is the name it was asked for, if any."""
    spec = lookup(requested) if requested else None
    if spec is not None:
        return spec.family, f"{spec.alias}: known model"
    spec = _quantized_from(folder)
    if spec is not None:
        return spec.family, f"pre-quantized from {spec.alias} ({QUANT_RECORD})"
    cfg = _config(folder, "transformer")
    if cfg and _matches(cfg, TINY_SPEC["transformer"]):
        return "tiny", "transformer config is the embedded tiny model's"
    if cfg and _matches(cfg, TRANSFORMER_MEDIUM):
        return "sd3.5-medium", "transformer config matches SD3.5 Medium (24 blocks)"
    if cfg and _matches(cfg, TRANSFORMER_LARGE):
        if "turbo" in _name_hints(folder):
            return "sd3.5-large-turbo", "transformer config matches SD3.5 Large and the folder is named Turbo"
        return "sd3.5-large", ("transformer config matches SD3.5 Large (38 blocks; Large Turbo has the same "
                               "architecture and is recognised by a folder name containing 'turbo')")
    return "sd3", "transformer config matches no published SD3.5 model: SD3's defaults"


def describe_folder(folder: Path, requested: str | None = None) -> ModelInfo:
    """Defaults and limits of the diffusers folder `folder`, from its own configs."""
    family, reason = family_of(folder, requested)
    t = _config(folder, "transformer") or (lookup(requested).transformer if requested and lookup(requested)
                                           else {})
    vae = _config(folder, "vae")
    vae_scale = 2 ** (len(vae.get("block_out_channels", VAE["block_out_channels"])) - 1)
    patch = int(t.get("patch_size", 2))
    sampling = FAMILIES[family]
    sample_size = t.get("sample_size")
    if family == "sd3" and isinstance(sample_size, int):  # an unknown model: its own native size
        side = sample_size * vae_scale
        sampling = Sampling(sampling.steps, sampling.guidance, side, side)
    max_side = int(t.get("pos_embed_max_size", 96)) * patch * vae_scale
    return ModelInfo(family, reason, sampling, patch, vae_scale, max_side)


def info_for(model: str, folder: Path | None) -> ModelInfo:
    """`describe_folder` when the files are at hand, else what the name alone tells (no download)."""
    if folder is not None and Path(folder).is_dir():
        return describe_folder(folder, model)
    spec = lookup(model)
    if spec is None:
        s = FAMILIES["sd3"]
        return ModelInfo("sd3", "not downloaded yet: SD3's defaults until its configs are read", s, 2, 8, 2048)
    t = spec.transformer
    vae_scale = 2 ** (len(spec.vae["block_out_channels"]) - 1)
    return ModelInfo(spec.family, f"{spec.alias}: known model", spec.sampling, t["patch_size"], vae_scale,
                     t["pos_embed_max_size"] * t["patch_size"] * vae_scale)
