"""`vqtok encode` end to end: tokenize an image dataset once into token shards (LlamaGen / RAR pre-tokenization).

The token directory's format is vqtok.data.token_shards; decoding and cropping is vqtok.data.crop_dataset.

Pipeline: DataLoader workers read, decode (PIL + RGB) and crop each image exactly once into its views
(uint8, so little crosses the process boundary); the main process converts to [0, 1] floats and runs
the tokenizer, so decoding hides behind the model. Views of B images go through the model as one
batch of B x V crops.

Sharding is deterministic: shard k holds inputs [k*S, (k+1)*S) of the sorted input list. Shards are
dealt round-robin to ranks (rank r encodes shards r, r+W, ...), a disjoint slice of the file list with
no padding and no duplicates, and the output is byte-identical for any number of ranks. A shard becomes
final only by a rename, so after a kill at any moment rerunning the same command re-encodes just the
unfinished shards and every input appears exactly once. Rank 0 writes the manifest after a barrier.
"""

from __future__ import annotations

import collections
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vqtok.data.crop_dataset import CropDataset, collate_crops
from vqtok.data.crops import crop_geometry
from vqtok.data.images import ImageListing, ImageRecord, list_images
from vqtok.data.token_shards import (
    FORMAT_VERSION,
    H5_NAME,
    MANIFEST,
    PROGRESS_DIR,
    SKIPPED,
    TokenShardWriter,
    merge_h5_parts,
    remove_stale_temporaries,
    shard_is_complete,
    shard_name,
    sidecar_path,
    token_dtype,
    write_json_atomic,
)
from vqtok.distributed import barrier, broadcast_object, init_distributed, raise_if_refused, shutdown_distributed
from vqtok.errors import UserError
from vqtok.signals import loader_worker_init

SETTINGS = "settings.json"


@dataclass
class EncodeOptions:
    input: str
    tokenizer: str
    out: str
    ten_crop: bool = False
    size: int | None = None  # None: the tokenizer's training resolution
    allow_grid_change: bool = False  # a size whose token grid differs from the tokenizer's training grid
    crop_range: float = 1.1
    split: str = "train"
    labels: str | None = None
    format: str = "wds"
    shard_size: int = 1000
    batch_size: int = 8
    workers: int = 2
    strict: bool = False
    overwrite: bool = False
    device: str | None = None

    def validate(self) -> None:
        if self.format not in ("wds", "h5"):
            raise UserError(f"--format must be wds or h5, got {self.format!r}")
        if self.size is not None and self.size <= 0:
            raise UserError(f"--size must be positive, got {self.size}")
        if self.ten_crop and self.crop_range < 1.0:
            raise UserError(f"--crop-range must be at least 1.0 (the ten crops are cut from a larger square), got {self.crop_range}")
        for name in ("shard_size", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise UserError(f"--workers must be 0 or more, got {self.workers}")


def _settings(opts: EncodeOptions, listing: ImageListing, identity: dict) -> dict:
    """Everything that determines the output bytes; a rerun with other settings is refused."""
    return {
        "input": os.path.abspath(listing.root),
        "layout": listing.layout,
        "inputs_fingerprint": listing.fingerprint(),
        "num_inputs": len(listing.records),
        "tokenizer_hash": identity.get("hash"),
        "tokenizer_preset": identity.get("preset"),
        "ten_crop": opts.ten_crop,
        "size": opts.size,
        "crop_range": opts.crop_range if opts.ten_crop else None,
        "format": opts.format,
        "shard_size": opts.shard_size,
    }


def _diff(a: dict, b: dict) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:4])


def _our_files(out: Path) -> list[Path]:
    names = {MANIFEST, SKIPPED, H5_NAME, PROGRESS_DIR}
    return [p for p in out.iterdir() if p.name in names or (p.name.startswith(("tokens-", ".tokens-", ".manifest", ".skipped")))]


def prepare_output(out: Path, settings: dict, overwrite: bool) -> str:
    """Create/validate the output dir on rank 0. Returns "done" (nothing to do), "resume" or "fresh"."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory")
    out.mkdir(parents=True, exist_ok=True)
    previous = None
    if (out / MANIFEST).is_file():
        previous = _read_json(out / MANIFEST).get("settings")
    elif (out / PROGRESS_DIR / SETTINGS).is_file():
        previous = _read_json(out / PROGRESS_DIR / SETTINGS)
    state = "fresh"
    if previous is not None and not overwrite:
        if previous != settings:
            raise UserError(
                f"{out} holds tokens made with different settings ({_diff(previous, settings)}); "
                "pass --overwrite to replace them or choose another --out"
            )
        state = "done" if (out / MANIFEST).is_file() else "resume"
    elif previous is None and any(out.iterdir()) and not (out / PROGRESS_DIR).is_dir():
        # --overwrite replaces only what an encode made (its manifest or progress files mark it)
        raise UserError(f"--out {out} is not empty and holds no vqtok encode output; choose an empty directory")
    if overwrite:
        for p in _our_files(out):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    removed = remove_stale_temporaries(out)
    if removed:
        print(f"removed temporary files of an interrupted encode: {', '.join(removed)}", flush=True)
    if state != "done":
        (out / PROGRESS_DIR).mkdir(exist_ok=True)
        write_json_atomic(out / PROGRESS_DIR / SETTINGS, settings)
    return state


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        raise UserError(f"{path} is unreadable or not JSON; pass --overwrite to start this output over") from None


# --------------------------------------------------------------------------------------------- run


class _Progress:
    """A rich bar on a terminal, plain periodic lines otherwise (logs, CI)."""

    def __init__(self, total: int, enabled: bool, log: Callable[[str], None]):
        self.total, self.enabled, self.log = total, enabled, log
        self.done, self.start, self.last = 0, time.time(), time.time()
        self.bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("encode"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn())
            self.task = self.bar.add_task("encode", total=total, rate="-")
            self.bar.start()

    def update(self, n: int) -> None:
        self.done += n
        rate = self.done / max(time.time() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(self.task, advance=n, rate=f"{rate:.1f}")
        elif self.enabled and (time.time() - self.last > 10 or self.done == self.total):
            self.last = time.time()
            self.log(f"encode: {self.done}/{self.total} images, {rate:.1f} img/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_encode(opts: EncodeOptions, log: Callable[[str], None] = print) -> dict | None:
    """Encode `opts.input` into `opts.out`; returns the manifest (on rank 0; None on other ranks).
    Holds the run lock on `opts.out`, so a second encode into the same directory is refused."""
    from vqtok.run_lock import run_lock

    opts.validate()
    with run_lock(opts.out, "encode"):
        return _run_encode(opts, log)


def _run_encode(opts: EncodeOptions, log: Callable[[str], None] = print) -> dict | None:
    from vqtok.tokenizer.tokenizer import load_tokenizer

    opts.validate()
    env = init_distributed(opts.device)
    device, rank, world = env.device, env.rank, env.world
    log = log if rank == 0 else (lambda _msg: None)
    try:
        listing = list_images(opts.input, opts.split, opts.labels)
        tok = load_tokenizer(opts.tokenizer, device=str(device))
        opts.size = resolve_size(tok, opts.size, opts.allow_grid_change, log)
        identity = dict(tok.identity())
        identity["scales"] = scales_at_size(tok, opts.size)
        identity["tokens_per_image"] = sum(h * w for h, w in identity["scales"])
        settings = _settings(opts, listing, identity)
        out = Path(opts.out)
        message, state = None, None
        if rank == 0:
            try:
                state = prepare_output(out, settings, opts.overwrite)
            except UserError as exc:
                message = str(exc)
        raise_if_refused(message)
        state = broadcast_object(state)
        if state == "done":
            log(f"{out} is already complete ({len(listing.records)} inputs, same settings); nothing to do")
            return _read_json(out / MANIFEST) if rank == 0 else None

        num_shards = (len(listing.records) + opts.shard_size - 1) // opts.shard_size
        mine = [k for k in range(rank, num_shards, world) if not shard_is_complete(out, k, opts.format)]
        done_before = len(range(rank, num_shards, world)) - len(mine)
        if done_before:
            log(f"resuming: {done_before} shard(s) already complete, {len(mine)} to encode on rank {rank}")
        _encode_shards(opts, listing, tok, device, out, mine, log, show_progress=rank == 0)
        barrier(env)
        if rank == 0:
            return finalize_output(out, opts, listing, identity, settings, num_shards, log)
        return None
    finally:
        if env.owns_group:
            shutdown_distributed()


def _encode_shards(opts, listing, tok, device, out: Path, shards: list[int], log, show_progress: bool = True) -> None:
    S = opts.shard_size
    items: list[tuple[int, ImageRecord]] = [
        (k, r) for k in shards for r in listing.records[k * S : (k + 1) * S]
    ]
    if not items:
        return
    views = 10 if opts.ten_crop else 2
    dtype = token_dtype(tok.vocab_size)
    tokens_per_view = sum(h * w for h, w in scales_at_size(tok, opts.size))
    remaining = collections.Counter(k for k, _ in items)
    writers: dict[int, TokenShardWriter] = {}
    dataset = CropDataset([r for _, r in items], opts.size, opts.ten_crop, opts.crop_range)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=opts.batch_size, shuffle=False, num_workers=opts.workers,
        collate_fn=collate_crops, prefetch_factor=4 if opts.workers else None,
        persistent_workers=False, pin_memory=device.type == "cuda", worker_init_fn=loader_worker_init(),
    )
    progress = _Progress(len(items), enabled=show_progress, log=log)
    try:
        for indices, crops, reasons in loader:
            codes = _encode_batch(tok, crops, device, views, tokens_per_view, dtype) if crops is not None else None
            j = 0
            for i, reason in zip(indices, reasons):
                k, record = items[i]
                writer = writers.get(k)
                if writer is None:
                    writer = writers[k] = TokenShardWriter(out, k, opts.format, dtype, views, tokens_per_view)
                if reason is None:
                    writer.write(record.key, codes[j], record.label)
                    j += 1
                elif opts.strict:
                    raise UserError(f"cannot decode {record.source}: {reason} (--strict makes this fatal; drop it to skip such files)")
                else:
                    writer.skip(record.key, record.source, reason)
                remaining[k] -= 1
                if remaining[k] == 0:
                    writers.pop(k).close()
            progress.update(len(indices))
    finally:
        progress.close()
        for writer in writers.values():  # unfinished shards: the next run redoes them
            writer.abort()


@torch.no_grad()
def _encode_batch(tok, crops: torch.Tensor, device, views: int, tokens_per_view: int, dtype) -> np.ndarray:
    from vqtok.device import autocast

    b = crops.shape[0]
    x = crops.reshape(b * views, *crops.shape[2:]).to(device, non_blocking=True).float().div_(255.0)
    with autocast(device):
        idx = tok.encode(x)
    idx = idx.reshape(b, views, tokens_per_view).cpu()
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= tok.vocab_size:  # a tokenizer bug, not a user error: keep the traceback
        raise RuntimeError(f"tokenizer produced index range [{lo}, {hi}] outside its vocabulary of {tok.vocab_size}")
    return idx.numpy().astype(dtype)


def resolve_size(tok, size: int | None, allow_grid_change: bool, log: Callable[[str], None]) -> int:
    """The crop size to encode at: the tokenizer's resolution by default. Another size changes the token
    grid (and with it the generator trained on these tokens), so it needs `allow_grid_change`."""
    if size is None:
        return int(tok.resolution)
    grid = scales_at_size(tok, size)
    native = scales_at_size(tok, int(tok.resolution))
    if grid != native:
        (h, w), (nh, nw) = grid[-1], native[-1]
        change = (f"--size {size} gives a {h}x{w} token grid ({h * w} tokens per view), but the tokenizer was trained "
                  f"at {tok.resolution}px ({nh}x{nw} grid, {nh * nw} tokens per view)")
        if not allow_grid_change:
            raise UserError(f"{change}; drop --size to encode at {tok.resolution}px, or pass --allow-grid-change "
                            "to train a generator on the other grid")
        log(f"note: {change}; encoding at {size}px as --allow-grid-change asks")
    return size


def scales_at_size(tok, size: int) -> list[list[int]]:
    """The token grid(s) a `size` x `size` crop gives: single-scale tokenizers work at any multiple of
    their downsampling factor; a multi-scale one only at its own resolution."""
    if size % tok.downsample:
        raise UserError(f"--size {size} must be a multiple of the tokenizer's downsampling factor {tok.downsample}")
    if len(tok.scales) > 1 or getattr(tok, "multiscale", False):
        if size != tok.resolution:
            raise UserError(f"this multi-scale tokenizer encodes {tok.resolution}px images only; pass --size {tok.resolution}")
        return [list(s) for s in tok.scales]
    return [[size // tok.downsample, size // tok.downsample]]


def scale_offsets(scales: list) -> list[int]:
    offsets = [0]
    for h, w in scales:
        offsets.append(offsets[-1] + int(h) * int(w))
    return offsets


def finalize_output(out: Path, opts: EncodeOptions, listing: ImageListing, identity: dict, settings: dict,
                    num_shards: int, log) -> dict:
    """Rank 0, after every rank finished: skipped.jsonl, (HDF5 merge), then manifest.json last."""
    import json

    sidecars = []
    for k in range(num_shards):
        if not shard_is_complete(out, k, opts.format):
            raise RuntimeError(f"shard {k} is not complete after all ranks finished")
        sidecars.append(json.loads(sidecar_path(out, k).read_text()))
    skipped = [s for car in sidecars for s in car["skipped"]]
    num_samples = sum(car["count"] for car in sidecars)
    tmp = out / f".{SKIPPED}.tmp"
    tmp.write_text("".join(json.dumps(s) + "\n" for s in skipped))
    os.replace(tmp, out / SKIPPED)
    views = 10 if opts.ten_crop else 2
    dtype = token_dtype(int(identity["vocab_size"]))
    scales = [list(s) for s in identity["scales"]]
    tokens_per_view = int(identity["tokens_per_image"])
    if opts.format == "h5":
        digest = merge_h5_parts(out, num_shards, dtype, (views, tokens_per_view), num_samples)
        shards = [{"name": H5_NAME, "count": num_samples, "sha256": digest, "parts": [car["count"] for car in sidecars]}]
    else:
        shards = [{"name": shard_name(k, "wds"), "count": car["count"], "sha256": car.get("sha256")} for k, car in enumerate(sidecars)]
    geometry = crop_geometry(opts.size, opts.ten_crop, opts.crop_range)
    manifest = {
        "format": opts.format,
        "version": FORMAT_VERSION,
        "tokenizer": {
            "preset": identity.get("preset"),
            "hash": identity.get("hash"),
            "vocab_size": int(identity["vocab_size"]),
            "scales": scales,
            "scale_offsets": scale_offsets(scales),
            "tokens_per_view": tokens_per_view,
            "resolution": identity.get("resolution"),
            "value_range": identity.get("value_range"),
        },
        "dtype": dtype.name,
        "views": geometry["views"],
        "geometry": geometry,
        "classes": listing.classes,
        "num_samples": num_samples,
        "num_skipped": len(skipped),
        "shards": shards,
        "source": {"root": listing.root, "layout": listing.layout, "split": opts.split, "num_inputs": len(listing.records)},
        "settings": settings,
    }
    write_json_atomic(out / MANIFEST, manifest)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    log(f"wrote {num_samples} samples x {views} views x {tokens_per_view} tokens ({dtype.name}) to {out} "
        f"in {len(shards)} {'shard' if len(shards) == 1 else 'shards'}")
    if skipped:
        log(f"skipped {len(skipped)} input(s) that could not be decoded ({summarise_reasons(skipped)}); see {out / SKIPPED}")
    return manifest


def summarise_reasons(skipped: list[dict]) -> str:
    counts = collections.Counter(s["reason"].split(" (")[0] for s in skipped)
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())

