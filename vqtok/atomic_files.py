"""Whole-file writes that are all or nothing: a crash or a full disk never leaves a half-written file under
the final name (previews, sample grids, small records).

The content is built in memory first (a PNG is encoded before anything touches the disk), written to a
temporary file in the destination's folder (unique per process and call, so concurrent writers never
share one), flushed to disk, and renamed over the destination in one step. On any failure the temporary
file is removed and the destination keeps its previous content; a filesystem fault (disk full,
read-only, permission denied) is a one-line `FilesystemError` naming the file.
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Any

from vqtok.fs_errors import writing


def atomic_write_bytes(path: str | Path, data: bytes | bytearray | memoryview) -> Path:
    """Write `data` to `path` atomically (see module docstring); returns `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise
    return path


def png_bytes(image: Any) -> bytes:
    """PNG encoding of a PIL image, an (H, W) / (H, W, 3|4) uint8 array, or a (3, H, W) float tensor in [0, 1]."""
    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        if hasattr(image, "detach"):  # a torch tensor, channels first, values in [0, 1]
            image = image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise ValueError(f"a PNG array must be uint8, got {arr.dtype}")
        image = Image.fromarray(np.ascontiguousarray(arr))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def atomic_write_png(path: str | Path, image: Any) -> Path:
    """Encode `image` (see `png_bytes`) and write it to `path` atomically; returns `path`."""
    return atomic_write_bytes(path, png_bytes(image))
