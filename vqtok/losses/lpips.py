"""LPIPS-VGG perceptual loss through the `lpips` package, loaded offline and checked.

Facts this wrapper relies on:
- the package's linear heads (`lin{0..4}.model.1.weight`) ship in the wheel at lpips/weights/v0.1/vgg.pth;
  they load with `strict=False`, so a `use_dropout=False` build silently leaves them random. We keep
  `use_dropout=True` (the key layout the file expects) and then compare every head with the file.
- the VGG16 trunk is the only runtime download. We never download: the trunk is built random
  (`pnet_rand=True`) and its ImageNet weights are copied in from the torch hub cache
  (`$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth`) or a path the user passes (`--lpips-weights`).
- inputs are in [-1, 1]; the module stays in eval mode (the Dropout in each head would otherwise turn on
  when a parent calls `.train()`) and its parameters are frozen.
- the package's channel normalisation adds 1e-10 outside the sqrt, which can overflow in half
  precision; we always run it in float32 with autocast off.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from vqtok.errors import UserError
from vqtok.weights import load_state_dict_file

VGG16_FILE = "vgg16-397923af.pth"
RANDOM_FOR_TESTS = "random-for-tests"

# torchvision vgg16.features index -> the lpips trunk slice holding it (relu1_2 .. relu5_3 cut points).
_SLICE_BOUNDS = [(0, 4, 1), (4, 9, 2), (9, 16, 3), (16, 23, 4), (23, 30, 5)]


def hub_vgg16_path() -> Path:
    """Where torchvision would cache the VGG16 ImageNet weights ($TORCH_HOME/hub/checkpoints/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def resolve_vgg16_weights(weights: str | Path | None) -> Path | None:
    """The VGG16 weights file to use, or None for the explicit random-trunk test mode."""
    if weights is not None and str(weights) == RANDOM_FOR_TESTS:
        return None
    path = Path(weights) if weights not in (None, "") else hub_vgg16_path()
    if not path.is_file():
        raise UserError(
            f"LPIPS needs the VGG16 ImageNet weights file {VGG16_FILE} but {path} does not exist; "
            f"download it once (https://download.pytorch.org/models/{VGG16_FILE}) and put it at "
            f"{hub_vgg16_path()} (or pass --lpips-weights PATH), or set loss.perceptual_weight=0"
        )
    return path


def vgg16_features_to_lpips(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map torchvision `features.N.*` keys (optionally prefixed) onto the lpips trunk `sliceK.N.*`."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if "features" not in parts:
            continue  # classifier weights are not part of the trunk
        i = parts.index("features")
        index, rest = int(parts[i + 1]), ".".join(parts[i + 2:])
        for start, stop, k in _SLICE_BOUNDS:
            if start <= index < stop:
                out[f"slice{k}.{index}.{rest}"] = value
    return out


def lpips_head_file() -> Path:
    import lpips

    return Path(lpips.__file__).resolve().parent / "weights" / "v0.1" / "vgg.pth"


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG: `lpips(x, y)` -> per-image distance (B,), inputs in [-1, 1]."""

    def __init__(self, vgg16_weights: str | Path | None = None):
        super().__init__()
        import lpips

        trunk_file = resolve_vgg16_weights(vgg16_weights)
        self.random_trunk = trunk_file is None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated" notice
            self.net = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, use_dropout=True, verbose=False)
        self._check_heads_loaded()
        if trunk_file is not None:
            self._load_trunk(trunk_file)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def _load_trunk(self, path: Path) -> None:
        state = load_state_dict_file(path)
        mapped = vgg16_features_to_lpips(state)
        expected = self.net.net.state_dict()
        if set(mapped) != set(expected):
            raise UserError(f"{path} is not a torchvision VGG16 state dict (features.0 .. features.28 weights expected)")
        for key, value in mapped.items():
            if value.shape != expected[key].shape:
                raise UserError(f"{path}: {key} has shape {tuple(value.shape)}, VGG16 needs {tuple(expected[key].shape)}")
        self.net.net.load_state_dict(mapped, strict=True)

    def _check_heads_loaded(self) -> None:
        """The linear heads must equal the wheel's vgg.pth (strict=False would hide a key mismatch)."""
        reference = torch.load(lpips_head_file(), map_location="cpu", weights_only=True)
        own = self.net.state_dict()
        for key, value in reference.items():
            if key not in own or not torch.equal(own[key].cpu(), value.to(own[key].dtype)):
                raise RuntimeError(f"LPIPS linear head {key} did not load from {lpips_head_file()}")

    def train(self, mode: bool = True) -> "LPIPS":
        # Always eval: the heads contain Dropout, and a parent's .train() must not switch it on.
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            d = self.net(x.float(), y.float(), normalize=False)
        return d.reshape(d.shape[0])


def build_lpips(weights: str | Path | None) -> LPIPS:
    """`weights`: None -> torch hub cache, a path, or the literal 'random-for-tests'."""
    return LPIPS(weights)
