"""`vqtok sample`: class-conditional images (or tokens) from a generator checkpoint; see vqtok.app.sample."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from vqtok.cli.app import app


class CfgPreset(str, Enum):
    paper = "paper"


class CudaGraphs(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class Dtype(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


@app.command(name="sample")
def sample_command(
    ckpt: Path = typer.Option(..., "--ckpt", help="Generator checkpoint directory (from train-ar or convert)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer checkpoint (default: the one the generator records)."),
    cfg: Optional[float] = typer.Option(None, "--cfg", help="Guidance scale; alone it is constant, with --cfg-preset paper it replaces only the paper's scale (0 disables CFG). Default 4.0."),
    cfg_schedule: Optional[str] = typer.Option(None, "--cfg-schedule", help="constant | linear | power-cosine | ramp (VAR's: 1 at the first step rising to the scale at the last)."),
    cfg_power: Optional[float] = typer.Option(None, "--cfg-power", help="Power-cosine exponent (implies power-cosine; 0 = constant)."),
    cfg_preset: Optional[CfgPreset] = typer.Option(None, "--cfg-preset", help="'paper': the published sampling settings of this generator size (RAR, VAR or LlamaGen release)."),
    cfg_interval: Optional[int] = typer.Option(None, "--cfg-interval", min=-1, help="LlamaGen's cfg_interval: guide the first token and this many more decode steps, then sample from the conditional rows alone (-1 = every step, the default)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Softmax temperature (0 = argmax). Default 1.0."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=0, help="Keep the k most likely tokens (0 = all; default 0, or the paper preset's)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus mass to keep (1 = all; default 1, or the paper preset's)."),
    classes: Optional[str] = typer.Option(None, "--classes", help="Comma-separated class ids or class names from the manifest, one image each: 1,207,360 or cat,dog."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="N images of every class, class-balanced (50 -> the FID-50k set)."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", help="N images with labels drawn from the seed (default 16)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward batch (CFG doubles the rows)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same tokens at any batch size or rank count (and same images at the same batch size)."),
    out: Path = typer.Option(Path("samples"), "--out", help="Output directory."),
    npz: bool = typer.Option(False, "--npz", help="Write samples.npz for the ADM evaluator (arr_0 uint8 NHWC, labels)."),
    png: bool = typer.Option(False, "--png", help="Write one PNG per image, images/{index:06d}.png."),
    tokens_only: bool = typer.Option(False, "--tokens-only", help="Skip decoding: write tokens.npy and labels.npy."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out directory."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps (default: best available)."),
    dtype: Dtype = typer.Option(Dtype.fp32, "--dtype", help="fp32, or bf16 autocast for the generator."),
    cuda_graphs: CudaGraphs = typer.Option(CudaGraphs.auto, "--cuda-graphs", help="Replay each decode step as a CUDA graph (auto: on for CUDA devices)."),
) -> None:
    """Sample class-conditional images with a KV-cached RAR, VAR or LlamaGen generator and classifier-free guidance.

    Writes grid.png (one row per class, with its name), labels.npy and sample.json into --out, plus samples.npz (--npz), per-image PNGs (--png) or token grids instead of pixels (--tokens-only).

    Prints the resolved guidance schedule, temperature and filters before it starts. Under torchrun the ranks split the label list and rank 0 writes the outputs.
    """
    from vqtok.app.sample import (LabelRequest, SampleJob, SampleOutput, SamplingRequest, describe, run_sampling,
                                  split_class_list)
    from vqtok.run_dirs import resolve_checkpoint
    from vqtok.run_lock import run_lock

    job = SampleJob(
        ckpt=resolve_checkpoint(ckpt, "--ckpt"),
        tokenizer=tokenizer and resolve_checkpoint(tokenizer, "--tokenizer"),
        sampling=SamplingRequest(guidance=cfg, schedule=cfg_schedule, power=cfg_power, paper=cfg_preset is not None,
                                 temperature=temperature, top_k=top_k, top_p=top_p, interval=cfg_interval),
        labels=LabelRequest(classes=tuple(split_class_list(classes)) if classes is not None else None,
                            per_class=per_class, num_samples=num_samples),
        output=SampleOutput(out=out, npz=npz, png=png, tokens_only=tokens_only, overwrite=overwrite),
        seed=seed, batch_size=batch_size, device=device, dtype=dtype.value, cuda_graphs=cuda_graphs.value,
    )
    with run_lock(out, "sample"):
        result = run_sampling(job, log=typer.echo)
    if result.files:  # rank 0 only
        typer.echo(describe(result))
