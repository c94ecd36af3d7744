"""Tokenizer evaluation: `vqtok reconstruct` (a few images, side by side) and `vqtok eval-tokenizer` (a dataset).

Protocol (the rFID protocol of LlamaGen and RAR): each image is ADM-center-cropped to the
tokenizer's resolution, encoded to tokens, decoded; the reconstruction is quantised to uint8 (round of
255 x, the same as LlamaGen's clamp(127.5 x + 128) on [-1, 1]) before any metric, so the numbers
describe exactly the pixels written to disk. PSNR and SSIM are per image on [0, 1] (data_range 1,
see image_metrics.py), averaged over images. LPIPS is LPIPS-VGG (inputs in [-1, 1]). rFID compares the
Inception statistics of the reconstructions with those of the same center-cropped originals.

Unreadable inputs: a path that does not exist is an error (exit 2) since it is usually a typo; a file
that exists but does not decode is skipped with a warning, and counted in the report. When nothing at
all decodes, that is an error.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vqtok.data.crops import center_crop_arr
from vqtok.data.images import ImageDecodeError, ImageRecord, decode_image, is_image_file, list_images, load_record, make_keys
from vqtok.errors import UserError
from vqtok.eval.codebook import CodebookStats
from vqtok.eval.image_metrics import psnr, ssim

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def to_uint8(images01: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> uint8 with rounding (clamped first)."""
    return images01.clamp(0, 1).mul(255).round().to(torch.uint8)


def eval_size(tok, size: int | None) -> int:
    size = int(size or tok.resolution)
    if size <= 0 or size % tok.downsample:
        raise UserError(f"--size {size} must be a positive multiple of the tokenizer's downsample factor {tok.downsample}")
    if len(tok.scales) > 1 and size != tok.resolution:
        raise UserError(f"this multi-scale tokenizer works at {tok.resolution}px only; drop --size or pass --size {tok.resolution}")
    return size


@torch.no_grad()
def reconstruct_batch(tok, images_u8: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, 3, S, S) -> (tokens (B, T), reconstruction uint8 (B, 3, S, S)), both on CPU."""
    x = images_u8.to(device).float().div(255.0)
    tokens = tok.encode(x)
    recon = tok.decode(tokens)
    return tokens.cpu(), to_uint8(recon).cpu()


# ------------------------------------------------------------------------------------------- reconstruct


@dataclass
class ImageScore:
    name: str
    source: str
    psnr: float
    ssim: float
    output: str


@dataclass
class ReconstructReport:
    images: list[ImageScore]
    skipped: list[dict]
    size: int
    grid: str
    mean_psnr: float = math.nan
    mean_ssim: float = math.nan

    def as_dict(self) -> dict:
        return {
            "size": self.size,
            "mean_psnr": self.mean_psnr,
            "mean_ssim": self.mean_ssim,
            "images": [s.__dict__ for s in self.images],
            "skipped": self.skipped,
            "grid": self.grid,
        }


def collect_image_paths(inputs: list[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for image files (sorted); missing paths are errors."""
    if not inputs:
        raise UserError("give at least one image file or folder")
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise UserError(f"input path {p} does not exist")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f.name))
            if not found:
                raise UserError(f"found no image files under {p}")
            out.extend(found)
        else:
            out.append(p)
    return out


def _load_center_crop(path: Path, size: int) -> np.ndarray:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"unreadable file ({exc.strerror or exc})") from None
    return center_crop_arr(decode_image(data), size)


def reconstruct_images(
    tok,
    inputs: list[str | Path],
    out_dir: str | Path,
    size: int | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    log: Log = _stderr,
) -> ReconstructReport:
    """Center-crop, encode, decode; write `<name>.png` (original | reconstruction), `grid.png`, `metrics.json`."""
    from vqtok.image_grid import reconstruction_grid, save_image_grid

    device = torch.device(device)
    size = eval_size(tok, size)
    paths = collect_image_paths(inputs)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {out_dir}: {exc.strerror or exc}") from None
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"output folder {out_dir} is not writable")

    names = make_keys([str(p) for p in paths])
    crops: list[tuple[str, Path, torch.Tensor]] = []
    skipped: list[dict] = []
    for name, path in zip(names, paths):
        try:
            arr = _load_center_crop(path, size)
        except ImageDecodeError as exc:
            skipped.append({"source": str(path), "reason": exc.reason})
            log(f"warning: skipping {path}: {exc.reason}")
            continue
        crops.append((name, path, torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)))
    if not crops:
        raise UserError(f"none of the {len(paths)} input file(s) could be decoded as an image")

    scores: list[ImageScore] = []
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for start in range(0, len(crops), batch_size):
        chunk = crops[start : start + batch_size]
        originals = torch.stack([c for _, _, c in chunk])
        _, recon = reconstruct_batch(tok, originals, device)
        x, y = originals.float() / 255.0, recon.float() / 255.0
        p_vals, s_vals = psnr(x, y).tolist(), ssim(x, y).tolist()
        for (name, path, _), orig, rec, p, s in zip(chunk, x, y, p_vals, s_vals):
            pair = torch.cat([orig, rec], dim=2)  # original | reconstruction
            target = out_dir / f"{name}.png"
            save_image_grid(pair, target)
            pairs.append((orig, rec))
            scores.append(ImageScore(name, str(path), p, s, str(target)))
    grid_path = out_dir / "grid.png"
    # captioned "original | reconstruction", upscaled (nearest) when small
    save_image_grid(reconstruction_grid(torch.stack([o for o, _ in pairs]), torch.stack([r for _, r in pairs])), grid_path)
    report = ReconstructReport(scores, skipped, size, str(grid_path))
    report.mean_psnr = float(np.mean([s.psnr for s in scores]))
    report.mean_ssim = float(np.mean([s.ssim for s in scores]))
    _write_json(out_dir / "metrics.json", report.as_dict())
    return report


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---------------------------------------------------------------------------------------- eval-tokenizer


class CenterCropDataset(torch.utils.data.Dataset):
    """Item i -> (i, uint8 (3, S, S) or None, failure reason or None); decoding runs in the workers."""

    def __init__(self, records: list[ImageRecord], size: int):
        self.records, self.size = records, size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        try:
            arr = center_crop_arr(load_record(self.records[i]), self.size)
            return i, torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1), None
        except ImageDecodeError as exc:
            return i, None, exc.reason


def _collate(items):
    ok = [img for _, img, _ in items if img is not None]
    failed = [(i, reason) for i, img, reason in items if img is None]
    return (torch.stack(ok) if ok else None), failed


def list_eval_records(data: str | Path) -> list[ImageRecord]:
    """Images to evaluate: DATA/val when it exists (ImageNet root), else what `list_images` finds."""
    root = Path(data)
    split = "val" if (root / "val").is_dir() else "train"
    return list_images(root, split=split).records


@dataclass
class TokenizerEvalOptions:
    data: str
    num: int | None = None
    batch_size: int = 16
    workers: int = 2
    lpips_weights: str | None = None
    inception_weights: str | None = None
    device: str | None = None
    progress: bool = True
    fid: bool = True  # try rFID when the Inception weights are available
    lpips: bool = True


@dataclass
class TokenizerEvalReport:
    num_images: int
    num_skipped: int
    resolution: int
    psnr: float
    ssim: float
    lpips: float | None
    rfid: float | None
    codebook: dict
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it was not computed
    failures: list[dict] = field(default_factory=list)
    tokenizer: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _optional_lpips(opts: TokenizerEvalOptions, device: torch.device):
    """(LPIPS module or None, reason it is unavailable). An explicit but missing path is an error."""
    if not opts.lpips:
        return None, "disabled (--no-lpips)"
    from vqtok.losses.lpips import build_lpips

    try:
        return build_lpips(opts.lpips_weights).to(device), None
    except UserError as exc:
        if opts.lpips_weights is not None:
            raise
        return None, str(exc)


def _optional_inception(opts: TokenizerEvalOptions, device: torch.device):
    if not opts.fid:
        return None, "disabled (--no-fid)"
    from vqtok.eval.inception import InceptionFeatures, find_inception_weights

    try:
        find_inception_weights(opts.inception_weights)
    except UserError as exc:
        if opts.inception_weights is not None:
            raise
        return None, str(exc)
    return InceptionFeatures(opts.inception_weights, device), None


def evaluate_tokenizer(tok, opts: TokenizerEvalOptions, log: Log = _stderr) -> TokenizerEvalReport:
    from vqtok.device import pick_device
    from vqtok.eval.fid import fid_from_features
    from vqtok.eval.progress import image_progress

    if opts.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {opts.batch_size}")
    if opts.num is not None and opts.num < 1:
        raise UserError(f"--num-images must be positive, got {opts.num}")
    device = pick_device(opts.device)
    tok = tok.to(device).eval()
    size = eval_size(tok, None)
    records = list_eval_records(opts.data)
    if opts.num is not None:
        records = records[: opts.num]

    lpips_model, lpips_reason = _optional_lpips(opts, device)
    inception, fid_reason = _optional_inception(opts, device)
    if lpips_reason:
        log(f"LPIPS skipped: {lpips_reason}")
    if fid_reason:
        log(f"rFID skipped: {fid_reason}")

    loader = torch.utils.data.DataLoader(
        CenterCropDataset(records, size), batch_size=opts.batch_size, shuffle=False,
        num_workers=opts.workers, collate_fn=_collate,
    )
    codebook = CodebookStats(tok.vocab_size, tok.scales)
    psnrs: list[float] = []
    ssims: list[float] = []
    lpipss: list[float] = []
    real_pool: list[np.ndarray] = []
    fake_pool: list[np.ndarray] = []
    failures: list[dict] = []
    with image_progress("eval-tokenizer", len(records), opts.progress) as advance:
        for originals, failed in loader:
            for i, reason in failed:
                failures.append({"source": records[i].source, "reason": reason})
                log(f"warning: skipping {records[i].source}: {reason}")
            if originals is None:
                advance(len(failed))
                continue
            tokens, recon = reconstruct_batch(tok, originals, device)
            codebook.update(tokens)
            x, y = originals.float() / 255.0, recon.float() / 255.0
            psnrs += psnr(x, y).tolist()
            ssims += ssim(x, y).tolist()
            if lpips_model is not None:
                with torch.no_grad():
                    d = lpips_model(x.to(device) * 2 - 1, y.to(device) * 2 - 1)
                lpipss += d.float().cpu().tolist()
            if inception is not None:
                real_pool.append(inception(originals)[0])
                fake_pool.append(inception(recon)[0])
            advance(len(originals) + len(failed))
    if not psnrs:
        raise UserError(f"none of the {len(records)} images under {opts.data} could be decoded")

    rfid = None
    if inception is not None:
        if len(psnrs) < 2:
            fid_reason = "rFID needs at least 2 images"
        else:
            rfid = fid_from_features(np.concatenate(fake_pool), np.concatenate(real_pool))
    skipped = {k: v for k, v in (("lpips", lpips_reason), ("rfid", fid_reason)) if v}
    return TokenizerEvalReport(
        num_images=len(psnrs),
        num_skipped=len(failures),
        resolution=size,
        psnr=float(np.mean(psnrs)),
        ssim=float(np.mean(ssims)),
        lpips=float(np.mean(lpipss)) if lpipss else None,
        rfid=rfid,
        codebook=codebook.report(),
        skipped=skipped,
        failures=failures,
        tokenizer={k: v for k, v in tok.identity().items() if k in ("preset", "vocab_size", "scales", "tokens_per_image", "resolution", "hash")},
    )


def write_report(report: TokenizerEvalReport | ReconstructReport, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, report.as_dict())
    return path
