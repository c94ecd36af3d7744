"""`vqtok sample` end to end: class labels, seeded sampling over the one sampling loop, decoding, output files.

The CLI builds one `SampleJob` (the sampling flags, the label request and the output options are one object
each) and calls `run_sampling`.

What a run writes into `--out DIR` (assembled in a hidden temporary directory next to it and renamed into
place at the end, so a failed or interrupted run leaves nothing half-written):

    grid.png            the first 64 images, one row per class with its name (not with --tokens-only)
    images/000000.png   one PNG per image, `{index:06d}.png` (--png)
    samples.npz         ADM-evaluator format (--npz): `arr_0` uint8 (N, H, W, 3), `labels` int64 (N,)
    tokens.npy          (N, h, w) token grids, raster order, uint16 (uint32 past 65,536 codes) (--tokens-only)
    labels.npy          (N,) int64 class ids, always
    sample.json         the resolved settings: checkpoint, tokenizer, sampling config, seed, labels spec

Labels. `--classes 1,207,360` gives one image per listed class (repeats allowed); an entry may also be a
class name the generator records from its token manifest (`--classes cat,dog`; a recorded name wins over
reading the entry as an id). `--per-class N` gives `list(range(C)) * N` (the class-balanced order of the
official FID script: 50 per class over 1000 classes is the standard 50,000-image set), and
`--num-samples N` draws N labels uniformly from `numpy.random.default_rng(seed).integers(0, C, N)`.

Determinism. Sample number g (its index in the label list) draws all its tokens from its own noise stream,
`numpy.random.default_rng([seed, g]).random(tokens)`, by inverse-CDF sampling. So the same seed gives the
same tokens whatever the batch size, the number of torchrun ranks or the device (the only exception is a
draw landing within float rounding of a CDF boundary, where different matmul blockings can pick the
neighbouring token). The same seed and batch size give bit-identical images; at another batch size the
tokenizer's batched convolutions round differently, which moves a rare truncated uint8 pixel by one
(3 of 61,440 values in the tests). The tokens come from the one sampling loop, vqtok.ar.sampling.sample
(the loop the conformance fixtures check), with its InverseCDFDraw over these per-sample uniforms.

Decoding runs eagerly over the KV cache, or with `--cuda-graphs` (default on for CUDA) as one replayed
CUDA graph per decode step over static buffers (vqtok.ar.cuda_graphs); the graphs are captured once per
run for `--batch-size` rows, and a last, smaller batch is padded to that size (the padding rows are
dropped; every row's tokens depend only on its own class and noise).

Images follow the FID protocol of the official RAR script: decoded images are
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

from vqtok.ar.families import family_of
from vqtok.ar.rar import RAR
from vqtok.ar.sampling import SCHEDULES, InverseCDFDraw, SamplingConfig, describe_sampling, draw_tokens, sample
from vqtok.atomic_files import atomic_write_png
from vqtok.errors import UserError
from vqtok.fs_errors import writing
from vqtok.image_grid import labelled_grid
from vqtok.validation import check_sampling_options
from vqtok.weights import refuse_foreign_dir, same_weights

GRID_MAX = 64  # images shown in grid.png
LABEL_STRIP = 12  # pixels of the caption strip under each grid image


# ------------------------------------------------------------------------------------------ labels


def split_class_list(text: str) -> list[str]:
    """"1,207,cat" -> ["1", "207", "cat"] (resolved against the generator's classes by `resolve_classes`)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError("--classes needs at least one class id or name, e.g. --classes 1,207,360")
    return items


def resolve_classes(items: list[str | int], class_names: list[str] | None) -> list[int]:
    """Class ids for `--classes` entries: a recorded class name is its index; otherwise an integer id."""
    index = {name: i for i, name in enumerate(class_names or [])}
    ids = []
    for item in items:
        if isinstance(item, int):
            ids.append(item)
        elif item in index:
            ids.append(index[item])
        else:
            try:
                ids.append(int(item))
            except ValueError:
                if not class_names:
                    raise UserError(f"--classes entry '{item}' is not a class id, and this generator records no class "
                                    "names; give integer ids") from None
                shown = ", ".join(class_names[:8]) + (", ..." if len(class_names) > 8 else "")
                raise UserError(f"--classes entry '{item}' is neither a class id nor one of this generator's "
                                f"{len(class_names)} class names ({shown})") from None
    return ids


def parse_class_list(text: str) -> list[int]:
    """"1,207,360" -> [1, 207, 360] (ids only)."""
    return resolve_classes(split_class_list(text), None)


def class_labels(num_classes: int, classes: list[int] | None = None, per_class: int | None = None,
                 num_samples: int | None = None, seed: int = 0) -> np.ndarray:
    """The (N,) int64 label list of a run; exactly one of `classes`, `per_class`, `num_samples` is given."""
    given = [name for name, v in (("--classes", classes), ("--per-class", per_class), ("--num-samples", num_samples))
             if v is not None]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} cannot be combined; give one of --classes, --per-class or --num-samples")
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
    if num_samples is None or num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {num_samples}")
    return np.random.default_rng(seed).integers(0, num_classes, num_samples).astype(np.int64)


def rank_chunk(total: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous [lo, hi) share of `total` samples for one rank (sizes differ by at most one)."""
    return total * rank // world, total * (rank + 1) // world


# ---------------------------------------------------------------------------------------- sampling


def sampling_config(paper_preset: str | None = None, guidance: float | None = None, schedule: str | None = None,
                    power: float | None = None, temperature: float | None = None, top_k: int | None = None,
                    top_p: float | None = None, interval: int | None = None) -> SamplingConfig:
    """Resolve the sampling flags. `--cfg 4.0` alone is a constant 4.0; `--cfg-power` alone implies
    power-cosine; with `paper_preset` (a size such as rar-b) the paper's values are the defaults that
    explicit flags override one by one (`--cfg-preset paper --cfg 8` keeps the paper's schedule and power
    and changes only the scale)."""
    if paper_preset is not None:
        from vqtok.ar.presets import paper_sampling

        base = paper_sampling(paper_preset)
    else:
        base = SamplingConfig()
    if schedule is None:
        if power is not None:
            schedule = "power-cosine"
        elif paper_preset is not None or guidance is None:
            schedule = base.guidance_schedule
        else:
            schedule = "constant"
    if schedule not in SCHEDULES:
        raise UserError(f"unknown --cfg-schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}")
    return dataclasses.replace(
        base,
        guidance_scale=base.guidance_scale if guidance is None else guidance,
        guidance_schedule=schedule,
        guidance_power=base.guidance_power if power is None else power,
        temperature=base.temperature if temperature is None else temperature,
        top_k=base.top_k if top_k is None else top_k,
        top_p=base.top_p if top_p is None else top_p,
        guidance_interval=base.guidance_interval if interval is None else interval,
    )


def sample_noise(seed: int, indices: range | list[int], num_tokens: int) -> torch.Tensor:
    """(B, num_tokens) float64 uniforms in [0, 1): sample g's own stream default_rng([seed, g])."""
    return torch.from_numpy(np.stack([np.random.default_rng([seed, g]).random(num_tokens) for g in indices]))


@torch.no_grad()
def sample_tokens(model: RAR, class_ids: torch.Tensor, cfg: SamplingConfig, uniforms: torch.Tensor,
                  decoder=None) -> torch.Tensor:
    """(B, N) raster-order tokens for raw class ids (B,), row b drawing from its own `uniforms` row (B, N):
    the one sampling loop with an InverseCDFDraw (and an optional decoder, e.g. a StaticDecoder)."""
    B, N = class_ids.shape[0], model.config.seq_len
    if uniforms.shape != (B, N):
        raise ValueError(f"uniforms must have shape {(B, N)}, got {tuple(uniforms.shape)}")
    return sample(model, class_ids, cfg, draw=InverseCDFDraw(uniforms), decoder=decoder).tokens


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
    want, identity = recorded.get("hash"), tokenizer.identity()
    have = identity.get("hash")
    if want and have and not same_weights(want, identity):
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


def recorded_class_names(identity: dict[str, Any]) -> list[str] | None:
    """The class names `train-ar` recorded in the generator's identity (from the token manifest), if any."""
    names = identity.get("classes")
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


@dataclass(frozen=True)
class SamplingRequest:
    """The sampling flags as given (None: not given). `resolve` makes the SamplingConfig once the generator
    is loaded, because `--cfg-preset paper` takes its defaults from the generator's size."""

    guidance: float | None = None
    schedule: str | None = None
    power: float | None = None
    paper: bool = False  # --cfg-preset paper
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    interval: int | None = None  # --cfg-interval

    def check(self) -> None:
        check_sampling_options(self.guidance, self.temperature, self.top_k, self.top_p, self.power)
        self.resolve(None)  # an unknown schedule fails before anything is loaded

    def resolve(self, paper_preset: str | None) -> SamplingConfig:
        return sampling_config(paper_preset, self.guidance, self.schedule, self.power, self.temperature,
                               self.top_k, self.top_p, self.interval)


@dataclass(frozen=True)
class LabelRequest:
    """Which labels to sample: at most one of `classes` (ids or recorded class names), `per_class` and
    `num_samples`; none of them: 16 labels drawn from the seed."""

    classes: tuple[int | str, ...] | None = None
    per_class: int | None = None
    num_samples: int | None = None

    def with_default(self) -> LabelRequest:
        """This request, or 16 labels drawn from the seed when it names none."""
        if self.classes is None and self.per_class is None and self.num_samples is None:
            return dataclasses.replace(self, num_samples=16)
        return self

    def resolve(self, num_classes: int, class_names: list[str] | None, seed: int) -> tuple[np.ndarray, list[int] | None]:
        """(the (N,) label list, the --classes entries as ids or None)."""
        req = self.with_default()
        classes = resolve_classes(list(req.classes), class_names) if req.classes is not None else None
        return class_labels(num_classes, classes, req.per_class, req.num_samples, seed), classes


@dataclass(frozen=True)
class SampleOutput:
    """What is written into `out` besides grid.png, labels.npy and sample.json."""

    out: Path = Path("samples")
    npz: bool = False
    png: bool = False
    tokens_only: bool = False
    overwrite: bool = False

    def check(self) -> None:
        if self.tokens_only and (self.npz or self.png):
            raise UserError("--tokens-only writes token grids only; it cannot be combined with --npz or --png")


@dataclass(frozen=True)
class SampleJob:
    ckpt: Path
    sampling: SamplingRequest = field(default_factory=SamplingRequest)
    labels: LabelRequest = field(default_factory=LabelRequest)
    output: SampleOutput = field(default_factory=SampleOutput)
    tokenizer: Path | None = None  # None: the tokenizer the generator records
    seed: int = 0
    batch_size: int = 32
    device: str | None = None
    dtype: str = "fp32"
    cuda_graphs: str = "auto"  # auto (on for CUDA) | on | off
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


def _check_job(job: SampleJob) -> None:
    job.output.check()
    if job.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {job.batch_size}")
    job.sampling.check()
    if job.dtype not in ("fp32", "bf16"):
        raise UserError(f"--dtype must be fp32 or bf16, got '{job.dtype}'")
    if job.cuda_graphs not in ("auto", "on", "off"):
        raise UserError(f"--cuda-graphs must be auto, on or off, got '{job.cuda_graphs}'")


def use_cuda_graphs(setting: str, device: torch.device, model: torch.nn.Module | None = None) -> bool:
    """auto: on for CUDA devices when the generator's family has a CUDA-graph decoder; on: required (a
    UserError elsewhere, or for a family without one); off: eager."""
    if setting == "on" and device.type != "cuda":
        raise UserError(f"--cuda-graphs on needs a CUDA device, but sampling runs on {device}; use --cuda-graphs off")
    capturable = model is None or hasattr(model, "graph_decoder")
    if setting == "on" and not capturable:
        raise UserError(f"{type(model).__name__} generators have no CUDA-graph decoder; "
                        "use --cuda-graphs off or auto")
    return capturable and (setting == "on" or (setting == "auto" and device.type == "cuda"))


def run_sampling(job: SampleJob, log=print) -> SampleResult:
    """Validate everything, sample (split over torchrun ranks), decode, write and publish `job.output.out`.

    `log` receives (on rank 0) the resolved settings before sampling starts."""
    from vqtok.ar.checkpoint import load_generator
    from vqtok.distributed import barrier, init_distributed, shutdown_distributed

    _check_job(job)
    ckpt, out = Path(job.ckpt), Path(job.output.out)
    env = init_distributed(job.device)
    device = env.device
    model, identity = load_generator(ckpt, device=device)
    mcfg = model.config
    class_names = recorded_class_names(identity)
    labels, classes = job.labels.resolve(mcfg.num_classes, class_names, job.seed)
    family = family_of(model)
    graphs = use_cuda_graphs(job.cuda_graphs, device, model)
    paper_name = None
    if job.sampling.paper:
        paper_name = identity.get("preset") or mcfg.identity_fields().get("preset")
        if paper_name is None:
            raise UserError(f"generator {ckpt} is not one of its family's published sizes, so --cfg-preset paper has no "
                            "settings for it; give --cfg, --cfg-schedule, --top-k, --top-p and --temperature instead")
    cfg = job.sampling.resolve(paper_name)
    tokenizer = tok_path = None
    # a family whose model reads the tokenizer (VAR builds each scale's input from its codebook) needs it
    # even for tokens only
    if not job.output.tokens_only or family.bind_tokenizer is not None:
        tokenizer, tok_path = resolve_tokenizer(identity, model, job.tokenizer, ckpt, device)
        if family.bind_tokenizer is not None:
            family.bind_tokenizer(model, tokenizer)
    if env.is_main:
        _check_out_dir(out, job.output.overwrite)
    work = out.parent / f".{out.name}.sampling"
    if env.is_main:
        work = _make_work_dir(out)
    barrier(env)
    if env.is_main:
        log(f"sampling {len(labels)} images of {mcfg.seq_len} tokens ({describe_labels(labels, class_names)}) "
            f"on {device}{f' x {env.world} ranks' if env.world > 1 else ''}, batch {job.batch_size}, {job.dtype}, "
            f"CUDA graphs {'on' if graphs else 'off'}, seed {job.seed}")
        log(f"sampling settings: {describe_sampling(cfg, mcfg.seq_len)}"
            + (f" (paper settings of {paper_name})" if paper_name else ""))

    try:
        start = time.perf_counter()
        lo, hi = rank_chunk(len(labels), env.rank, env.world)
        # numpy reports a full disk as a short write without a file name: name the output folder
        with writing(out, "write the samples to"):
            _sample_range(model, tokenizer, cfg, labels, lo, hi, job, work, device, env.is_main, graphs)
        barrier(env)
        seconds = time.perf_counter() - start
        files: list[str] = []
        if env.is_main:
            with writing(out, "write the samples to"):
                files = _assemble(work, labels, tokenizer, job.output, class_names)
            settings = {
                "generator": str(ckpt), "generator_preset": identity.get("preset"),
                "tokenizer": str(tok_path) if tok_path else None, "sampling": dataclasses.asdict(cfg),
                "paper_preset": paper_name, "seed": job.seed, "num_samples": int(len(labels)),
                "labels": {"classes": classes, "per_class": job.labels.per_class,
                           "num_samples": job.labels.with_default().num_samples},
                "class_names": class_names, "cuda_graphs": graphs,
                "noise": "sample g draws with numpy default_rng([seed, g]) (inverse CDF)",
                "image_format": "clamp to [0,1], (x*255) truncated to uint8",
                "dtype": job.dtype, "device": str(device), "world_size": env.world, "seconds": round(seconds, 3),
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


def describe_labels(labels: np.ndarray, class_names: list[str] | None) -> str:
    """'classes 3 (cat), 5 (dog)' for a few distinct labels, else a count of classes."""
    distinct = sorted(set(labels.tolist()))
    if len(distinct) > 6:
        return f"{len(distinct)} classes"
    names = class_names or []
    return "class" + ("es " if len(distinct) > 1 else " ") + ", ".join(
        f"{c} ({names[c]})" if c < len(names) else str(c) for c in distinct)


def _make_decoder(model: torch.nn.Module, cfg: SamplingConfig, batch: int, graphs: bool):
    """The decoder reused by every batch of a run: the family's CUDA graphs over static buffers, or its
    eager KV cache."""
    if not graphs:
        return model.default_decoder(True)
    if cfg.order is not None and not torch.equal(model.generation_order(cfg.order), model.generation_order()):
        raise UserError("--cuda-graphs captures the generator's trained scan order; use --cuda-graphs off for --order")
    return model.graph_decoder(batch, cfg.uses_cfg)


def batch_draw(seed: int, first: int, count: int, num_tokens: int, rows: int) -> InverseCDFDraw:
    """The draw of samples first..first+count-1 (their own noise streams), padded with zero rows to `rows`."""
    noise = sample_noise(seed, range(first, first + count), num_tokens)
    if rows > count:
        noise = torch.cat([noise, noise.new_zeros(rows - count, num_tokens)])
    return InverseCDFDraw(noise)


def _sample_range(model, tokenizer, cfg, labels, lo, hi, job: SampleJob, work: Path, device, show: bool,
                  graphs: bool = False) -> None:
    """Sample labels[lo:hi] in batches, writing each batch's tokens (and pixels when needed) to `work`."""
    from vqtok.eval.progress import image_progress

    # one token grid: tokens.npy holds (N, h, w); multi-scale tokens stay (N, tokens), scales concatenated
    grid_shape = getattr(model.config, "grid_shape", None) or (model.config.seq_len,)
    token_dtype = np.uint16 if model.config.vocab_size <= 65536 else np.uint32
    (work / "_tokens").mkdir(exist_ok=True)
    keep_pixels = not job.output.tokens_only
    if keep_pixels:
        (work / "_pixels").mkdir(exist_ok=True)
    if job.output.png:
        (work / "images").mkdir(exist_ok=True)
    if hi <= lo:
        return
    with _autocast(device, job.dtype):
        # a static decoder runs a fixed row count: the last batch is padded to it (the padding is dropped)
        rows = min(job.batch_size, hi - lo)
        decoder = _make_decoder(model, cfg, rows, graphs)
    with image_progress("sampling", hi - lo, enabled=job.progress and show) as advance:
        for b0 in range(lo, hi, job.batch_size):
            b1 = min(b0 + job.batch_size, hi)
            count = b1 - b0
            batch_rows = rows if getattr(decoder, "batch", None) is not None else count  # static: fixed rows
            classes = torch.from_numpy(labels[b0:b1])
            if batch_rows > count:
                classes = torch.cat([classes, classes[-1:].expand(batch_rows - count)])
            draw = batch_draw(job.seed, b0, count, model.config.seq_len, batch_rows)
            with _autocast(device, job.dtype):
                tokens = sample(model, classes, cfg, draw=draw, decoder=decoder).tokens[:count]
            np.save(work / "_tokens" / f"{b0:09d}.npy", tokens.cpu().numpy().astype(token_dtype).reshape(-1, *grid_shape))
            if keep_pixels:
                pixels = to_uint8_nhwc(tokenizer.decode(tokens))
                if job.output.npz:
                    np.save(work / "_pixels" / f"{b0:09d}.npy", pixels)
                elif b0 < GRID_MAX:  # only the grid needs pixels back
                    np.save(work / "_pixels" / f"{b0:09d}.npy", pixels[: GRID_MAX - b0])
                if job.output.png:
                    _save_pngs(pixels, b0, work / "images")
            advance(count)


def _save_pngs(pixels: np.ndarray, first: int, folder: Path) -> None:
    for i, img in enumerate(pixels):
        atomic_write_png(folder / f"{first + i:06d}.png", img)


def _assemble(work: Path, labels: np.ndarray, tokenizer, output: SampleOutput, class_names: list[str] | None) -> list[str]:
    """Rank 0: build the final files from the per-batch files of every rank."""
    files = ["labels.npy"]
    np.save(work / "labels.npy", labels)
    token_files = _batch_files(work / "_tokens")
    if output.tokens_only:
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
    atomic_write_png(work / "grid.png", labelled_grid(grid_images, labels[: len(grid_images)], class_names))
    files.append("grid.png")
    if output.npz:
        write_adm_npz(work / "samples.npz", pixel_files, labels)
        files.append("samples.npz")
    if output.png:
        files.append("images/")
    return files


def describe(result: SampleResult) -> str:
    return (f"wrote {result.num_samples} samples to {result.out} ({', '.join(result.files)}) in {result.seconds:.1f}s, "
            f"{result.images_per_second:.2f} img/s")


__all__ = [
    "SampleJob", "SamplingRequest", "LabelRequest", "SampleOutput", "SampleResult", "class_labels", "parse_class_list", "split_class_list", "resolve_classes",
    "rank_chunk", "sampling_config", "sample_noise", "draw_tokens", "sample_tokens", "batch_draw", "use_cuda_graphs",
    "check_tokenizer", "resolve_tokenizer", "to_uint8_nhwc",
    "write_adm_npz", "run_sampling", "describe",
]
