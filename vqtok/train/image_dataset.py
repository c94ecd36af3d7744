"""The tokenizer training dataset: ADM random-resized crops + horizontal flips, deterministic per sample.

Each sample is addressed by (epoch, index) (see sampler.py) and its augmentation draws from a
`random.Random` seeded by (seed, epoch, index), so the images a step sees do not depend on worker
count, rank count or whether the run was resumed. A file that cannot be decoded is skipped: the next
index in the listing takes its place (the batch keeps its size) and the skip is reported with the
batch so the trainer can count and log it; it is never fatal mid-run.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset

from vqtok.data.crops import center_crop_arr, random_crop_arr
from vqtok.data.images import ImageDecodeError, ImageRecord, load_record
from vqtok.errors import UserError


class TrainImageDataset(Dataset):
    def __init__(self, records: list[ImageRecord], resolution: int, scale_range: tuple[float, float], hflip: bool, seed: int):
        lo, hi = scale_range
        if not 1.0 <= lo <= hi:
            raise UserError(f"data.scale_range must satisfy 1 <= low <= high; got {list(scale_range)}")
        self.records, self.resolution, self.hflip, self.seed = records, resolution, hflip, seed
        # random_crop_arr draws the short side from [size/max_frac, size/min_frac]
        self.min_frac, self.max_frac = 1.0 / hi, 1.0 / lo

    def __len__(self) -> int:
        return len(self.records)

    def _decode(self, index: int) -> tuple[object, list[tuple[str, str]]]:
        skipped = []
        for attempt in range(len(self.records)):
            record = self.records[(index + attempt) % len(self.records)]
            try:
                return load_record(record), skipped
            except ImageDecodeError as exc:
                skipped.append((record.source, exc.reason))
        raise UserError("no image in the dataset could be decoded")

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        rng = random.Random(f"{self.seed}/{epoch}/{index}")  # str seeds hash with sha512: stable across runs
        img, skipped = self._decode(index)
        arr = random_crop_arr(img, self.resolution, self.min_frac, self.max_frac, rng=rng)
        if self.hflip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return {"image": to_tensor(arr), "skipped": skipped}


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H,W,3) uint8 -> (3,H,W) float in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)


def collate(items: list[dict]) -> dict:
    return {
        "images": torch.stack([it["image"] for it in items]),
        "skipped": [s for it in items for s in it["skipped"]],
    }


def preview_images(records: list[ImageRecord], resolution: int, count: int, draw: int | None = None) -> torch.Tensor | None:
    """Center crops of `count` decodable images: the first ones, or with `draw` a seeded choice (a
    different set for each draw, e.g. each preview step, the same on every rank and every rerun)."""
    if draw is not None:
        order = np.random.default_rng([0x9E37, int(draw)]).permutation(len(records))
        records = [records[i] for i in order]
    out = []
    for record in records:
        if len(out) == count:
            break
        try:
            out.append(to_tensor(center_crop_arr(load_record(record), resolution)))
        except ImageDecodeError:
            continue
    return torch.stack(out) if out else None
