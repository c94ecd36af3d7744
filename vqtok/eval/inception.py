"""The Inception-v3 feature extractor behind FID and Inception Score.

We use torch-fidelity's `FeatureExtractorInceptionV3`: a PyTorch port of the TensorFlow 2015-12-05
Inception graph that the ADM evaluator (openai/guided-diffusion `evaluations/evaluator.py`) runs,
including TF1's bilinear resize to 299x299 and the unbiased logits used for IS. Writing a new port would
only add one more source of small numeric differences.

Its weights cannot ship in a package. They are read from `--inception-weights PATH` or from the torch hub
cache (`$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth`, TORCH_HOME defaulting to
~/.cache/torch); when neither exists we stop with a message naming the file and where to put it. We never
download. The file goes through `vqtok.weights.load_state_dict_file` (tensors only, no pickle) and must
hold exactly the extractor's keys; torch-fidelity itself would unpickle the file without that check.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from vqtok.errors import UserError
from vqtok.weights import load_state_dict_file

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
EXTRACTOR_NAME = "inception-v3-compat"
POOL_DIM = 2048
NUM_LOGITS = 1008  # the TF graph's 1008-way classifier (1000 classes plus unused slots)


def _torch_fidelity_inception():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise UserError("FID/IS need the torch-fidelity package; install it with `pip install torch-fidelity`") from None
    return FeatureExtractorInceptionV3


def hub_weights_path() -> Path:
    """Where torch hub (and torch-fidelity) keep the Inception weights: $TORCH_HOME/hub/checkpoints/."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def _download_hint() -> str:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3 as url
    except ImportError:
        url = "torch-fidelity's GitHub release v0.2.0"
    return url


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The weights file to use: the given path, else the torch hub cache; a UserError when absent."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"Inception weights file {p} does not exist; it should be {INCEPTION_WEIGHTS_FILE} (from {_download_hint()})")
        return p
    cached = hub_weights_path()
    if cached.is_file():
        return cached
    raise UserError(
        f"Inception weights for FID/IS not found: download {INCEPTION_WEIGHTS_FILE} from {_download_hint()} "
        f"and put it in {cached.parent}/ (or pass --inception-weights PATH); vqtok does not download weights"
    )


def weights_identity(path: Path) -> str:
    """Short description of the weights file, stored with cached reference statistics."""
    return f"{path.name}:{path.stat().st_size}"


class InceptionFeatures:
    """Runs uint8 image batches (B, 3, H, W) through Inception: pool_3 features (B, 2048) and unbiased logits."""

    def __init__(self, weights_path: str | os.PathLike | None = None, device: torch.device | str = "cpu"):
        self.weights_path = find_inception_weights(weights_path)
        self.device = torch.device(device)
        self.model = load_inception(self.weights_path).to(self.device)

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] != 3:
            raise UserError(f"Inception expects uint8 images (B, 3, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}")
        pool, logits = self.model(images_uint8.to(self.device))
        return pool.double().cpu().numpy(), logits.double().cpu().numpy()


def load_inception(weights_path: Path):
    """torch-fidelity's extractor with weights read safely (tensors only) and checked key by key."""
    cls = _torch_fidelity_inception()
    state = load_state_dict_file(weights_path)
    # Hand torch-fidelity a buffer we serialised ourselves from plain tensors, so its
    # `torch.load(weights_only=False)` never unpickles the user's file.
    buffer = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in state.items()}, buffer)
    buffer.seek(0)
    try:
        model = cls(EXTRACTOR_NAME, ["2048", "logits_unbiased"], feature_extractor_weights_path=buffer)
    except RuntimeError as exc:  # load_state_dict: missing/unexpected keys or shape mismatch
        first = " ".join(str(exc).split())[:240]
        raise UserError(
            f"{weights_path} is not the torch-fidelity Inception-v3 state dict ({INCEPTION_WEIGHTS_FILE}): {first}"
        ) from None
    return model.eval()
