"""The images `vqtok encode` feeds the tokenizer: each decoded once and cut into its crop views, in the workers.

Items are uint8, so little crosses the process boundary; a file that cannot be decoded comes back as its
failure reason instead of raising, so one bad file costs one sample, not the run.
"""

from __future__ import annotations

import torch

from vqtok.data.crops import crop_views
from vqtok.data.images import ImageDecodeError, ImageRecord, load_record


class CropDataset(torch.utils.data.Dataset):
    """Item i -> (i, views uint8 (V, 3, S, S) or None, failure reason or None). Runs in the workers."""

    def __init__(self, records: list[ImageRecord], size: int, ten: bool, crop_range: float):
        self.records, self.size, self.ten, self.crop_range = records, size, ten, crop_range

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        try:
            return i, crop_views(load_record(self.records[i]), self.size, self.ten, self.crop_range), None
        except ImageDecodeError as exc:
            return i, None, exc.reason


def collate_crops(items):
    """Keep order; stack the decoded views, carry failures alongside."""
    ok = [views for _, views, _ in items if views is not None]
    return [i for i, _, _ in items], (torch.stack(ok) if ok else None), [reason for _, _, reason in items]
