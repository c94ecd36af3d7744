"""`vqtok sample` as a library: class labels, seeded KV-cached sampling, decoding, and the output files.

What a run writes into `--out DIR` (assembled in a hidden temporary directory next to it and renamed into
place at the end, so a failed or interrupted run leaves nothing half-written):

    grid.png            the first 64 images, one row per class with its name (not with --tokens-only)
    images/000000.png   one PNG per image, `{index:06d}.png` (--png)
    samples.npz         ADM-evaluator format (--npz): `arr_0` uint8 (N, H, W, 3), `labels` int64 (N,)
    tokens.npy          (N, h, w) token grids, raster order, uint16 (uint32 past 65,536 codes) (--tokens-only)
    labels.npy          (N,) int64 class ids, always
    sample.json         the resolved settings: checkpoint, tokenizer, sampling config, seed, labels spec

Labels. `--classes 1,207,360` gives one image per listed id (repeats allowed), `--per-class N` gives
`list(range(C)) * N` (the class-balanced order of the official FID script: 50 per class over 1000 classes
is the standard 50,000-image set), and `--num N` draws N labels uniformly from
`numpy.random.default_rng(seed).integers(0, C, N)`.

Determinism. Sample number g (its index in the label list) draws all its tokens from its own noise stream,
`numpy.random.default_rng([seed, g]).random(tokens)`, by inverse-CDF sampling. So the same seed gives the
same tokens whatever the batch size, the number of torchrun ranks or the device (the only exception is a
draw landing within float rounding of a CDF boundary, where different matmul blockings can pick the
neighbouring token). The same seed and batch size give bit-identical images; at another batch size the
tokenizer's batched convolutions round differently, which moves a rare truncated uint8 pixel by one
(3 of 61,440 values in the tests). (The RAR sampler in vqtok.ar.sampling draws for a whole batch from one torch.Generator,
so its results depend on how samples are batched; that is why this module runs its own step loop over the
model's cached `prefill` / `decode_step` with the same CFG schedule and logit filters.)

Images follow the FID protocol of the official RAR script (reference rar.md §2.5): decoded images are
clamped to [0, 1] and converted with `(x * 255)` truncated to uint8.

Distributed. Under torchrun every rank takes a contiguous chunk of the label list, writes its batches as
files into the shared temporary directory, and rank 0 assembles the outputs after a barrier (gloo on CPU).
Batches are streamed to disk, so memory does not grow with the number of samples; the npz is written
member by member straight from the batch files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from vqtok.ar.orders import scan_order
from vqtok.ar.rar import RAR
from vqtok.ar.sampling import SCHEDULES, SamplingConfig, filter_logits, guidance_schedule
from vqtok.errors import UserError
from vqtok.validation import check_sampling_options
from vqtok.weights import refuse_foreign_dir

GRID_MAX = 64  # images shown in grid.png
LABEL_STRIP = 12  # pixels of the caption strip under each grid image


# ------------------------------------------------------------------------------------------ labels


def parse_class_list(text: str) -> list[int]:
    """"1,207,360" -> [1, 207, 360]."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError("--classes needs at least one class id, e.g. --classes 1,207,360")
    try:
        return [int(t) for t in items]
    except ValueError:
        raise UserError(f"--classes must be comma-separated integers, got '{text}'") from None


def class_labels(num_classes: int, classes: list[int] | None = None, per_class: int | None = None,
                 num: int | None = None, seed: int = 0) -> np.ndarray:
    """The (N,) int64 label list of a run; exactly one of `classes`, `per_class`, `num` is given."""
    given = [name for name, v in (("--classes", classes), ("--per-class", per_class), ("--num", num)) if v is not None]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} cannot be combined; give one of --classes, --per-class or --num")
    if classes is not None:
        labels = np.asarray(classes, dtype=np.int64)
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.size:
            raise UserError(f"class id {int(bad[0])} is outside this generator's {num_classes} classes (0..{num_classes - 1})")
        return labels
    if per_class is not None:
        if per_class < 1:
            raise UserError(f"--per-class must be at least 1, got {per_class}")
        return np.tile(np.arange(num_classes, dtype=np.int64), per_class)
    if num is None or num < 1:
        raise UserError(f"--num must be at least 1, got {num}")
    return np.random.default_rng(seed).integers(0, num_classes, num).astype(np.int64)


def rank_chunk(total: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous [lo, hi) share of `total` samples for one rank (sizes differ by at most one)."""
    return total * rank // world, total * (rank + 1) // world


# ---------------------------------------------------------------------------------------- sampling


def sampling_config(paper_preset: str | None = None, guidance: float | None = None, schedule: str | None = None,
                    power: float | None = None, temperature: float | None = None, top_k: int = 0,
                    top_p: float = 1.0) -> SamplingConfig:
    """Resolve the sampling flags. `--cfg 4.0` alone is a constant 4.0; `--cfg-power` alone implies
    power-cosine; with `paper_preset` (a size such as rar-b) the paper's values are the defaults that
    explicit flags override."""
    if paper_preset is not None:
        from vqtok.ar.presets import paper_sampling

        base = paper_sampling(paper_preset)
    else:
        base = SamplingConfig()
    if schedule is None:
        schedule = "power-cosine" if power is not None else (base.guidance_schedule if guidance is None else "constant")
    if schedule not in SCHEDULES:
        raise UserError(f"unknown --cfg-schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}")
    return dataclasses.replace(
        base,
        guidance_scale=base.guidance_scale if guidance is None else guidance,
        guidance_schedule=schedule,
        guidance_power=base.guidance_power if power is None else power,
        temperature=base.temperature if temperature is None else temperature,
        top_k=top_k,
        top_p=top_p,
    )


def sample_noise(seed: int, indices: range | list[int], num_tokens: int) -> torch.Tensor:
    """(B, num_tokens) float64 uniforms in [0, 1): sample g's own stream default_rng([seed, g])."""
    return torch.from_numpy(np.stack([np.random.default_rng([seed, g]).random(num_tokens) for g in indices]))


def draw_tokens(logits: torch.Tensor, cfg: SamplingConfig, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row from (B, V) guided logits: temperature, top-k/top-p, then the inverse CDF at `uniforms`
    (B,). Temperature 0 takes the argmax. Equivalent in distribution to `torch.multinomial` on the softmax."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(dim=-1)
    cdf = probs.double().cumsum(dim=-1)
    target = uniforms.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]
    # right=True: the first token whose cumulative mass exceeds the target, so zero-probability tokens
    # (flat stretches of the CDF) are never chosen
    token = torch.searchsorted(cdf, target, right=True)[:, 0]
    return token.clamp_max(logits.shape[-1] - 1)


@torch.no_grad()
def sample_tokens(model: RAR, class_ids: torch.Tensor, cfg: SamplingConfig, uniforms: torch.Tensor) -> torch.Tensor:
    """(B, N) raster-order tokens for raw class ids (B,), each row drawing from its own `uniforms` row (B, N).

    The same loop as vqtok.ar.sampling.sample (preallocated KV cache, prefill of [cls, cond], one token per
    step, conditional and null-class rows in one doubled batch, guidance mixed before the temperature); only
    the draw differs (per-row noise instead of one generator for the batch).
    """
    mcfg = model.config
    device = model.lm_head.weight.device
    class_ids = class_ids.to(device)
    B, N = class_ids.shape[0], mcfg.seq_len
    if uniforms.shape != (B, N):
        raise ValueError(f"uniforms must have shape {(B, N)}, got {tuple(uniforms.shape)}")
    uniforms = uniforms.to(device)
    order = scan_order(cfg.order or mcfg.order, *mcfg.grid_shape).to(device)
    cond_ids = model.condition_ids(class_ids)
    if cfg.uses_cfg:
        cond_ids = torch.cat([cond_ids, model.null_condition_ids(B, device)])
        scales = guidance_schedule(cfg, N).tolist()
    orders = order.expand(cond_ids.shape[0], N)
    cache = model.new_cache(cond_ids.shape[0], device=device)
    cond_emb = model.embeddings(cond_ids)
    generated = torch.empty(B, N, dtype=torch.long, device=device)
    logits = model.prefill(cond_ids, orders, cache)
    for step in range(N):
        if step:
            logits = model.decode_step(prev, step, cond_emb, orders, cache)
        logits = logits.float()
        if cfg.uses_cfg:
            cond, uncond = logits.chunk(2)
            logits = uncond + (cond - uncond) * scales[step]
        token = draw_tokens(logits, cfg, uniforms[:, step])
        generated[:, step] = token
        prev = torch.cat([token, token]) if cfg.uses_cfg else token
    return torch.empty_like(generated).scatter_(1, orders[:B], generated)


# ---------------------------------------------------------------------------------------- tokenizer


def check_tokenizer(gen_identity: dict[str, Any], model: RAR, tokenizer, tokenizer_path: str | Path) -> None:
    """Refuse a tokenizer whose vocabulary, token count or (when both are known) weights hash differ from
    what the generator was trained on."""
    mcfg = model.config
    if tokenizer.vocab_size != mcfg.vocab_size:
        raise UserError(f"tokenizer {tokenizer_path} has {tokenizer.vocab_size} codes but the generator samples "
                        f"{mcfg.vocab_size}; pass the tokenizer the generator was trained with (--tokenizer)")
    try:
        tokenizer.grid_for(mcfg.seq_len)
    except UserError:
        raise UserError(f"tokenizer {tokenizer_path} makes {tokenizer.tokens_per_image} tokens per image but the generator "
                        f"samples {mcfg.seq_len}; pass the tokenizer the generator was trained with (--tokenizer)") from None
    recorded = gen_identity.get("tokenizer") or {}
    if recorded.get("tokens_per_image") not in (None, mcfg.seq_len):
        raise UserError(f"the generator records {recorded['tokens_per_image']} tokens per image from its tokenizer but "
                        f"samples {mcfg.seq_len}; its checkpoint is inconsistent")
    want, have = recorded.get("hash"), tokenizer.identity().get("hash")
    if want and have and want != have:
        raise UserError(f"tokenizer {tokenizer_path} (hash {have[:12]}) is not the one the generator was trained with "
                        f"(hash {want[:12]}, preset {recorded.get('preset')}); pass that tokenizer with --tokenizer")


def resolve_tokenizer(gen_identity: dict[str, Any], model: RAR, tokenizer_path: str | Path | None, ckpt: Path, device):
    """Load `--tokenizer`, else the path recorded in the generator checkpoint, and check it matches."""
    from vqtok.tokenizer.tokenizer import load_tokenizer

    if tokenizer_path is None:
        recorded = gen_identity.get("tokenizer_path") or (gen_identity.get("tokenizer") or {}).get("path")
        if not recorded:
            raise UserError(f"generator {ckpt} does not record where its tokenizer is; pass it with --tokenizer CKPT")
        tokenizer_path = Path(recorded)
        if not tokenizer_path.is_absolute() and not tokenizer_path.exists():
            tokenizer_path = ckpt / tokenizer_path  # a path relative to the checkpoint directory
        if not tokenizer_path.exists():
            raise UserError(f"the tokenizer recorded by generator {ckpt} ({recorded}) does not exist; pass it with --tokenizer")
    tokenizer = load_tokenizer(tokenizer_path, device=device)
    check_tokenizer(gen_identity, model, tokenizer, tokenizer_path)
    return tokenizer, Path(tokenizer_path)


# ------------------------------------------------------------------------------------------- images


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3) by clamping and truncating x*255, as the official FID script."""
    return images.float().clamp(0, 1).mul(255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def labelled_grid(images: np.ndarray, labels: np.ndarray, class_names: list[str] | None = None):
    """uint8 (N, H, W, 3) -> a PIL image: one row per class, its name (or id) at the row's start."""
    from PIL import Image

    from vqtok.train.images import sample_grid

    grid = sample_grid(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2), labels.tolist(), class_names)
    return Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())


def recorded_class_names(ckpt: Path) -> list[str] | None:
    """The class names `train-ar` recorded in generator.json (from the token manifest), if any."""
    try:
        names = json.loads((Path(ckpt) / "generator.json").read_text()).get("classes")
    except (OSError, ValueError):
        return None
    return [str(n) for n in names] if isinstance(names, list) and names else None


# -------------------------------------------------------------------------------------------- files


def _batch_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.npy")) if folder.is_dir() else []


def _iter_rows(files: list[Path]) -> Iterator[np.ndarray]:
    for f in files:
        yield np.load(f)


def write_npy_streaming(fh, arrays: Iterator[np.ndarray], shape: tuple[int, ...], dtype) -> None:
    """Write a .npy of `shape` to an open binary file from row batches, never holding it whole."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(fh, header)
    rows = 0
    for a in arrays:
        fh.write(np.ascontiguousarray(a, dtype=dtype).tobytes())
        rows += a.shape[0]
    if rows != shape[0]:
        raise RuntimeError(f"wrote {rows} rows, expected {shape[0]}")


def write_adm_npz(path: Path, pixel_files: list[Path], labels: np.ndarray) -> None:
    """`arr_0` uint8 NHWC streamed from the batch files, and `labels`; uncompressed, as numpy.savez writes."""
    first = np.load(pixel_files[0], mmap_mode="r")
    shape = (len(labels), *first.shape[1:])
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as fh:
            write_npy_streaming(fh, _iter_rows(pixel_files), shape, np.uint8)
        with zf.open("labels.npy", "w") as fh:
            np.save(fh, labels)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} already exists and is not empty; pass --overwrite to replace it")
    refuse_foreign_dir(out, ("sample.json",), "`vqtok sample` output")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot create --out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write --out {out}: {parent} is not writable")


def _make_work_dir(out: Path) -> Path:
    work = out.parent / f".{out.name}.sampling"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if work.exists():  # left by a killed run
            shutil.rmtree(work)
        work.mkdir()
    except OSError as exc:
        raise UserError(f"cannot write --out {out} ({exc.strerror or exc})") from None
    return work


def _publish(work: Path, out: Path) -> None:
    """Move the finished work directory to `out` in one rename (replacing an old `out` only at the very end)."""
    from vqtok.weights import replace_dir

    for sub in ("_tokens", "_pixels"):
        shutil.rmtree(work / sub, ignore_errors=True)
    replace_dir(work, out)


# ---------------------------------------------------------------------------------------------- run


@dataclass
class SampleOptions:
    ckpt: Path
    out: Path = Path("samples")
    tokenizer: Path | None = None
    classes: list[int] | None = None
    per_class: int | None = None
    num: int | None = None
    guidance: float | None = None
    schedule: str | None = None
    power: float | None = None
    paper: bool = False  # --cfg-preset paper
    temperature: float | None = None
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 32
    seed: int = 0
    npz: bool = False
    png: bool = False
    tokens_only: bool = False
    overwrite: bool = False
    device: str | None = None
    dtype: str = "fp32"
    progress: bool = True


@dataclass
class SampleResult:
    out: Path
    num_samples: int
    seconds: float
    files: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.num_samples / max(self.seconds, 1e-9)


def _check_options(opts: SampleOptions) -> None:
    if opts.tokens_only and (opts.npz or opts.png):
        raise UserError("--tokens-only writes token grids only; it cannot be combined with --npz or --png")
    if opts.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {opts.batch_size}")
    check_sampling_options(opts.guidance, opts.temperature, opts.top_k, opts.top_p, opts.power)
    if opts.dtype not in ("fp32", "bf16"):
        raise UserError(f"--dtype must be fp32 or bf16, got '{opts.dtype}'")
    if opts.classes is None and opts.per_class is None and opts.num is None:
        opts.num = 16


def run_sampling(opts: SampleOptions) -> SampleResult:
    """Validate everything, sample (split over torchrun ranks), decode, write and publish `opts.out`."""
    from vqtok.ar.checkpoint import load_generator
    from vqtok.train.distributed import barrier, init_distributed, shutdown_distributed

    _check_options(opts)
    ckpt, out = Path(opts.ckpt), Path(opts.out)
    env = init_distributed(opts.device)
    device = env.device
    model, identity = load_generator(ckpt, device=device)
    mcfg = model.config
    labels = class_labels(mcfg.num_classes, opts.classes, opts.per_class, opts.num, opts.seed)
    paper_name = None
    if opts.paper:
        from vqtok.ar.presets import preset_for

        paper_name = identity.get("preset") or preset_for(mcfg)
        if paper_name is None:
            raise UserError(f"generator {ckpt} is not one of the paper's RAR sizes, so --cfg-preset paper has no settings "
                            "for it; give --cfg, --cfg-power and --temperature instead")
    cfg = sampling_config(paper_name, opts.guidance, opts.schedule, opts.power, opts.temperature, opts.top_k, opts.top_p)
    tokenizer = tok_path = None
    if not opts.tokens_only:
        tokenizer, tok_path = resolve_tokenizer(identity, model, opts.tokenizer, ckpt, device)
    if env.is_main:
        _check_out_dir(out, opts.overwrite)
    work = out.parent / f".{out.name}.sampling"
    if env.is_main:
        work = _make_work_dir(out)
    barrier(env)

    try:
        start = time.perf_counter()
        lo, hi = rank_chunk(len(labels), env.rank, env.world)
        _sample_range(model, tokenizer, cfg, labels, lo, hi, opts, work, device, env.is_main)
        barrier(env)
        seconds = time.perf_counter() - start
        files: list[str] = []
        if env.is_main:
            files = _assemble(work, labels, tokenizer, opts)
            settings = {
                "generator": str(ckpt), "generator_preset": identity.get("preset"),
                "tokenizer": str(tok_path) if tok_path else None, "sampling": dataclasses.asdict(cfg),
                "paper_preset": paper_name, "seed": opts.seed, "num_samples": int(len(labels)),
                "labels": {"classes": opts.classes, "per_class": opts.per_class, "num": opts.num},
                "noise": "sample g draws with numpy default_rng([seed, g]) (inverse CDF)",
                "image_format": "clamp to [0,1], (x*255) truncated to uint8",
                "dtype": opts.dtype, "device": str(device), "world_size": env.world, "seconds": round(seconds, 3),
            }
            (work / "sample.json").write_text(json.dumps(settings, indent=2) + "\n")
            files.append("sample.json")
            _publish(work, out)
        barrier(env)
    except BaseException:
        if env.is_main:
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        shutdown_distributed()
    return SampleResult(out=out, num_samples=len(labels), seconds=seconds, files=files)


def _autocast(device: torch.device, dtype: str):
    import contextlib

    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sample_range(model, tokenizer, cfg, labels, lo, hi, opts: SampleOptions, work: Path, device, show: bool) -> None:
    """Sample labels[lo:hi] in batches, writing each batch's tokens (and pixels when needed) to `work`."""
    from vqtok.eval.progress import image_progress

    grid_shape = model.config.grid_shape
    token_dtype = np.uint16 if model.config.vocab_size <= 65536 else np.uint32
    (work / "_tokens").mkdir(exist_ok=True)
    keep_pixels = not opts.tokens_only
    if keep_pixels:
        (work / "_pixels").mkdir(exist_ok=True)
    if opts.png:
        (work / "images").mkdir(exist_ok=True)
    with image_progress("sampling", hi - lo, enabled=opts.progress and show) as advance:
        for b0 in range(lo, hi, opts.batch_size):
            b1 = min(b0 + opts.batch_size, hi)
            classes = torch.from_numpy(labels[b0:b1])
            noise = sample_noise(opts.seed, range(b0, b1), model.config.seq_len)
            with _autocast(device, opts.dtype):
                tokens = sample_tokens(model, classes, cfg, noise)
            np.save(work / "_tokens" / f"{b0:09d}.npy", tokens.cpu().numpy().astype(token_dtype).reshape(-1, *grid_shape))
            if keep_pixels:
                pixels = to_uint8_nhwc(tokenizer.decode(tokens))
                if opts.npz:
                    np.save(work / "_pixels" / f"{b0:09d}.npy", pixels)
                elif b0 < GRID_MAX:  # only the grid needs pixels back
                    np.save(work / "_pixels" / f"{b0:09d}.npy", pixels[: GRID_MAX - b0])
                if opts.png:
                    _save_pngs(pixels, b0, work / "images")
            advance(b1 - b0)


def _save_pngs(pixels: np.ndarray, first: int, folder: Path) -> None:
    from PIL import Image

    for i, img in enumerate(pixels):
        Image.fromarray(img).save(folder / f"{first + i:06d}.png")


def _assemble(work: Path, labels: np.ndarray, tokenizer, opts: SampleOptions) -> list[str]:
    """Rank 0: build the final files from the per-batch files of every rank."""
    files = ["labels.npy"]
    np.save(work / "labels.npy", labels)
    token_files = _batch_files(work / "_tokens")
    if opts.tokens_only:
        first = np.load(token_files[0], mmap_mode="r")
        with open(work / "tokens.npy", "wb") as fh:
            write_npy_streaming(fh, _iter_rows(token_files), (len(labels), *first.shape[1:]), first.dtype)
        return files + ["tokens.npy"]
    pixel_files = _batch_files(work / "_pixels")
    shown = []
    for f in pixel_files:
        shown.append(np.load(f))
        if sum(len(a) for a in shown) >= GRID_MAX:
            break
    grid_images = np.concatenate(shown)[:GRID_MAX]
    labelled_grid(grid_images, labels[: len(grid_images)], recorded_class_names(opts.ckpt)).save(work / "grid.png")
    files.append("grid.png")
    if opts.npz:
        write_adm_npz(work / "samples.npz", pixel_files, labels)
        files.append("samples.npz")
    if opts.png:
        files.append("images/")
    return files


def describe(result: SampleResult) -> str:
    return (f"wrote {result.num_samples} samples to {result.out} ({', '.join(result.files)}) in {result.seconds:.1f}s, "
            f"{result.images_per_second:.2f} img/s")


__all__ = [
    "SampleOptions", "SampleResult", "class_labels", "parse_class_list", "rank_chunk", "sampling_config",
    "sample_noise", "draw_tokens", "sample_tokens", "check_tokenizer", "resolve_tokenizer", "to_uint8_nhwc",
    "labelled_grid", "write_adm_npz", "run_sampling", "describe",
]
