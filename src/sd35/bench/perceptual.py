"""LPIPS (AlexNet, v0.1) between two images, from weights already on this machine — or a reason why not.

Why our own forward pass instead of `import lpips`: the lpips package imports torchvision, whose PyPI wheel is
built against PyPI's CUDA torch and does not even import beside a CPU build of torch; the network itself is
five convolutions and five 1x1 heads. The module names mirror lpips' (`net.sliceK.I`, `linK.model.1`), so a
state dict saved from `lpips.LPIPS(net="alex")` loads as it is, and the numbers are lpips' numbers.

Where the weights come from, first found wins (never downloaded: a report on an offline box says what is
missing rather than inventing a number):
1. `SD35_LPIPS_WEIGHTS`: a full LPIPS state dict, or torchvision's AlexNet checkpoint;
2. the torch hub cache: `<torch.hub.get_dir()>/checkpoints/alexnet-owt-7be5be79.pth`;
3. the shared cache: `<HF_HUB_CACHE>/sd35-lpips/` (either file).
An AlexNet checkpoint carries no LPIPS heads; those (6 KB) come from the same folder (`alex.pth`) or from the
installed `lpips` package's data (the `lpips` extra), read as a file, without importing the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's ImageNet AlexNet, as torch hub caches it
HEADS_FILE = "alex.pth"  # lpips' v0.1 linear heads (lpips/weights/v0.1/alex.pth)
SHARED_DIR = "sd35-lpips"
# torchvision AlexNet `features` index -> the lpips slice it sits in (relu1..relu5 are the slice outputs).
_SLICES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3, 6: 3, 7: 3, 8: 4, 9: 4, 10: 5, 11: 5}
_CHANNELS = (64, 192, 384, 256, 256)


@dataclass
class Weights:
    """Where LPIPS comes from here: a state dict of the whole network, with its sources, or why none."""

    state: dict | None
    source: str  # the files read, or the reason LPIPS is missing


def _network():
    """AlexNet's convolutional trunk cut at relu1..relu5, plus the five heads, named as in lpips."""
    from torch import nn

    layers = [nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(64, 192, 5, padding=2),
              nn.ReLU(), nn.MaxPool2d(3, 2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
              nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()]
    net = nn.Module()
    for k in range(1, 6):
        net.add_module(f"slice{k}", nn.Sequential())
    for i, layer in enumerate(layers):
        getattr(net, f"slice{_SLICES[i]}").add_module(str(i), layer)
    model = nn.Module()
    model.net = net
    for k, c in enumerate(_CHANNELS):
        head = nn.Module()
        head.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
        model.add_module(f"lin{k}", head)
    return model.eval()


def _read(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _from_alexnet(state: dict) -> dict:
    """torchvision's `features.I.*` keys as lpips' `net.sliceK.I.*` (the classifier is not used)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "features" and int(parts[1]) in _SLICES:
            out[f"net.slice{_SLICES[int(parts[1])]}.{'.'.join(parts[1:])}"] = value
    return out


def _package_heads() -> Path | None:
    """The installed lpips package's v0.1 AlexNet heads, found without importing lpips (it imports torchvision)."""
    import importlib.util

    spec = importlib.util.find_spec("lpips")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "weights" / "v0.1" / HEADS_FILE
        if path.is_file():
            return path
    return None


def candidates(settings) -> list[Path]:
    """The files looked at, in order (see the module docstring)."""
    import torch

    shared = Path(settings.hf_hub_cache).expanduser() / SHARED_DIR
    found = [Path(settings.lpips_weights).expanduser()] if settings.lpips_weights else []
    return found + [Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE, shared / "lpips-alex.pth",
                    shared / ALEXNET_FILE]


def find_weights(settings) -> Weights:
    """The first usable weights (see the module docstring), or the reason there are none."""
    looked = candidates(settings)
    if settings.lpips_weights and not looked[0].is_file():
        return Weights(None, f"SD35_LPIPS_WEIGHTS={looked[0]} is not a file")
    path = next((p for p in looked if p.is_file()), None)
    if path is None:
        return Weights(None, "no AlexNet-LPIPS weights on this machine (looked in " + ", ".join(map(str, looked))
                       + "); never downloaded: copy alexnet-owt-7be5be79.pth there or set SD35_LPIPS_WEIGHTS")
    try:
        state = _read(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: say which and why, never guess
        return Weights(None, f"{path} is not a readable torch state dict ({type(exc).__name__})")
    if isinstance(state, dict) and any(k.startswith("features.") for k in state):
        state = _from_alexnet(state)
    if not isinstance(state, dict) or not any(str(k).startswith("net.slice") for k in state):
        return Weights(None, f"{path} is not an AlexNet-LPIPS state dict (no AlexNet trunk in it)")
    if not any(k.startswith("lin") for k in state):
        heads = next((p for p in (path.parent / HEADS_FILE, _package_heads()) if p and p.is_file()), None)
        if heads is None:
            return Weights(None, f"{path} has the AlexNet trunk but no LPIPS heads: install the lpips extra "
                                 f"(pip install -c constraints.txt -e '.[lpips]') or put {HEADS_FILE} beside it")
        return Weights({**state, **_read(heads)}, f"{path} + {heads}")
    return Weights(state, str(path))


class LPIPS:
    """lpips.LPIPS(net="alex", version="0.1") in evaluation: distance between two uint8 RGB images."""

    def __init__(self, state: dict):
        import torch

        self.model = _network()
        # lpips' own state dict also holds its fixed input scaling and `lins.K`, an alias of `linK`.
        self.model.load_state_dict({k: v for k, v in state.items()
                                    if not k.startswith(("scaling_layer.", "lins."))}, strict=True)
        self.shift = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
        self.scale = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]

    def _features(self, x):
        outs = []
        for k in range(1, 6):
            x = getattr(self.model.net, f"slice{k}")(x)
            outs.append(x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return outs

    def __call__(self, a, b) -> float:
        """LPIPS between two uint8 RGB images (PIL or HxWx3 arrays), as lpips computes it on [-1, 1] inputs."""
        import numpy as np
        import torch

        def tensor(img):
            arr = np.asarray(img, dtype=np.float32)[..., :3] / 127.5 - 1.0
            return (torch.from_numpy(arr).permute(2, 0, 1)[None] - self.shift) / self.scale

        with torch.no_grad():
            fa, fb = self._features(tensor(a)), self._features(tensor(b))
            total = sum(getattr(self.model, f"lin{k}").model((x - y) ** 2).mean(dim=(2, 3))
                        for k, (x, y) in enumerate(zip(fa, fb)))
        return float(total.squeeze())


def scorer(settings) -> tuple[LPIPS | None, str]:
    """(an LPIPS scorer, where its weights came from) or (None, why LPIPS is missing here)."""
    weights = find_weights(settings)
    if weights.state is None:
        return None, weights.source
    try:
        return LPIPS(weights.state), weights.source
    except RuntimeError as exc:  # a state dict of another network
        first = (str(exc).strip().splitlines() or [""])[0]
        return None, f"{weights.source} is not an AlexNet-LPIPS state dict ({first[:120]})"
