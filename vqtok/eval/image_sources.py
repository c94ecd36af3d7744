"""Image sets for FID/IS: ADM-format .npz batches and folders of PNG/JPEG files, read in uint8 batches.

ADM format (openai/guided-diffusion `evaluations/evaluator.py`): an .npz whose `arr_0` is uint8 NHWC,
values 0..255. A reference batch may also carry precomputed `mu`/`sigma` (pool_3 statistics). We stream
`arr_0` out of the zip a batch at a time, as the ADM evaluator does, so a 50,000 x 256 x 256 x 3 file
(9.8 GB) never sits in memory at once.

Folders are read in sorted order (recursively); every file decodes through `vqtok.data.images`, so
CMYK, grayscale and PNG-named-JPEG files become RGB. Images are fed to Inception at their own size
(Inception resizes to 299 itself, like the ADM evaluator); a file that fails to decode stops the run
with its name, since a silently smaller sample set would change FID.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from vqtok.data.images import ImageDecodeError, decode_image, is_image_file
from vqtok.errors import UserError


@dataclass
class NpzContents:
    path: Path
    has_images: bool
    num_images: int
    image_shape: tuple[int, ...]  # (H, W, C) of arr_0, () when absent
    mu: np.ndarray | None
    sigma: np.ndarray | None


def _open_npz(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserError(f"{path} is not a readable .npz file ({exc})") from None


def _read_npy_header(fh, member: str, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            return fmt.read_array_header_1_0(fh)
        return fmt.read_array_header_2_0(fh)
    except ValueError as exc:
        raise UserError(f"{path}: member {member} is not a valid .npy array ({exc})") from None


def inspect_npz(path: str | Path) -> NpzContents:
    """What an .npz holds: image count and shape of `arr_0`, and `mu`/`sigma` if present (loaded)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    with _open_npz(path) as zf:
        names = set(zf.namelist())
        num, shape, has_images = 0, (), "arr_0.npy" in names
        if has_images:
            with zf.open("arr_0.npy") as fh:
                full_shape, _, dtype = _read_npy_header(fh, "arr_0", path)
            _check_image_array(path, full_shape, dtype)
            num, shape = full_shape[0], tuple(full_shape[1:])
    mu = sigma = None
    if "mu.npy" in names and "sigma.npy" in names:
        with np.load(path) as data:
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise UserError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a mean vector and its covariance")
    if not has_images and mu is None:
        raise UserError(f"{path} holds neither images (arr_0) nor statistics (mu and sigma); keys: {sorted(n[:-4] for n in names)}")
    return NpzContents(path, has_images, num, shape, mu, sigma)


def _check_image_array(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if len(shape) != 4 or shape[3] != 3:
        raise UserError(f"{path}: arr_0 has shape {shape}; the ADM format is (N, H, W, 3) uint8")
    if dtype != np.uint8:
        raise UserError(f"{path}: arr_0 has dtype {dtype}; the ADM format is uint8 with values 0..255")
    if shape[0] == 0:
        raise UserError(f"{path}: arr_0 holds no images")


def iter_npz_images(path: str | Path, batch_size: int, limit: int | None = None) -> Iterator[torch.Tensor]:
    """Yield uint8 batches (B, 3, H, W) from `arr_0`, streamed from the zip member."""
    path = Path(path)
    with _open_npz(path) as zf, zf.open("arr_0.npy") as fh:
        shape, fortran, dtype = _read_npy_header(fh, "arr_0", path)
        _check_image_array(path, shape, dtype)
        if fortran:
            raise UserError(f"{path}: arr_0 is stored in Fortran order; save it with np.savez from a C-ordered array")
        per_image = int(np.prod(shape[1:]))
        total = shape[0] if limit is None else min(limit, shape[0])
        done = 0
        while done < total:
            n = min(batch_size, total - done)
            raw = fh.read(n * per_image)
            if len(raw) != n * per_image:
                raise UserError(f"{path}: arr_0 is truncated after {done + len(raw) // per_image} images")
            arr = np.frombuffer(raw, dtype=np.uint8).reshape(n, *shape[1:])
            yield torch.from_numpy(arr.copy()).permute(0, 3, 1, 2).contiguous()
            done += n


def list_image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a directory")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p.name))
    if not files:
        raise UserError(f"found no image files under {folder}")
    return files


def read_image_uint8(path: Path) -> torch.Tensor:
    """(3, H, W) uint8 from an image file; a UserError naming the file when it does not decode."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        img = decode_image(data)
    except ImageDecodeError as exc:
        raise UserError(f"{path} cannot be decoded as an image: {exc.reason}") from None
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def iter_folder_images(files: list[Path], batch_size: int) -> Iterator[torch.Tensor]:
    """Yield uint8 batches (B, 3, H, W); a batch is cut early where the image size changes."""
    batch: list[torch.Tensor] = []
    for path in files:
        img = read_image_uint8(path)
        if batch and (len(batch) == batch_size or img.shape != batch[0].shape):
            yield torch.stack(batch)
            batch = []
        batch.append(img)
    if batch:
        yield torch.stack(batch)


class ImageSet:
    """An .npz or a folder as a sized source of uint8 image batches."""

    def __init__(self, path: str | Path, limit: int | None = None):
        self.path = Path(path)
        self.limit = limit
        self.npz: NpzContents | None = None
        self.files: list[Path] = []
        if not self.path.exists():
            raise UserError(f"{self.path} does not exist")
        if self.path.is_dir():
            self.files = list_image_files(self.path)
        elif self.path.suffix.lower() == ".npz":
            self.npz = inspect_npz(self.path)
        else:
            raise UserError(f"{self.path} is neither an .npz file (ADM format) nor a folder of images")

    @property
    def has_images(self) -> bool:
        return self.npz is None or self.npz.has_images

    @property
    def stats(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Precomputed (mu, sigma) carried by an ADM reference batch, else None."""
        if self.npz is not None and self.npz.mu is not None:
            return self.npz.mu, self.npz.sigma
        return None

    def __len__(self) -> int:
        n = self.npz.num_images if self.npz is not None else len(self.files)
        return n if self.limit is None else min(n, self.limit)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        if batch_size < 1:
            raise UserError(f"--batch-size must be positive, got {batch_size}")
        if self.npz is not None:
            if not self.npz.has_images:
                raise UserError(f"{self.path} holds only statistics (mu, sigma), no images (arr_0)")
            return iter_npz_images(self.path, batch_size, self.limit)
        files = self.files if self.limit is None else self.files[: self.limit]
        return iter_folder_images(files, batch_size)
