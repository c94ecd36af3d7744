"""CLI: `vqtok encode` (images -> token shards), `vqtok inspect` (check a token dir), `vqtok demo-data`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vqtok.cli.app import app
from vqtok.errors import UserError


@app.command(name="encode")
def encode(
    input: Path = typer.Argument(..., help="ImageNet dir (DIR/train/<class>/...), class folders, a flat image folder, or webdataset image shards."),
    tokenizer: str = typer.Option(..., "--tokenizer", help="Tokenizer checkpoint directory (made by vqtok)."),
    out: Path = typer.Option(..., "--out", help="Output directory for the token shards and manifest.json."),
    ten_crop: bool = typer.Option(False, "--ten-crop", help="Ten crops per image (LlamaGen/RAR); default: center crop + flip."),
    size: Optional[int] = typer.Option(None, "--size", help="Crop size in pixels (default: the tokenizer's resolution)."),
    allow_grid_change: bool = typer.Option(
        False, "--allow-grid-change", help="Allow a --size whose token grid differs from the tokenizer's training grid."
    ),
    crop_range: float = typer.Option(1.1, "--crop-range", help="Ten-crop: crops are cut from an ADM center square of int(size x this)."),
    split: str = typer.Option("train", "--split", help="Subfolder of INPUT to use when it exists."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Flat folders: file with lines '<file name> <label>'."),
    format: str = typer.Option("wds", "--format", help="wds (tar shards) or h5 (one HDF5 file)."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Images per shard."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per model batch (each contributes all its views)."),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes that decode and crop."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first file that cannot be decoded instead of skipping it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an output made with different settings."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps (default: best available)."),
) -> None:
    """Tokenize an image dataset once into token shards (resumable; torchrun splits the work)."""
    from vqtok.app.encode import EncodeOptions, run_encode
    from vqtok.run_dirs import resolve_checkpoint

    run_encode(EncodeOptions(
        input=str(input), tokenizer=str(resolve_checkpoint(tokenizer)), out=str(out), ten_crop=ten_crop, size=size,
        allow_grid_change=allow_grid_change, crop_range=crop_range,
        split=split, labels=str(labels) if labels else None, format=format, shard_size=shard_size,
        batch_size=batch_size, workers=workers, strict=strict, overwrite=overwrite, device=device,
    ))


@app.command(name="inspect")
def inspect(
    path: Path = typer.Argument(..., help="A `vqtok encode` output directory."),
    quick: bool = typer.Option(False, "--quick", help="Skip verifying each shard's sha256 against the manifest."),
) -> None:
    """Print a token directory's manifest summary and validate every shard (exit 2 if broken)."""
    from vqtok.data.inspect_tokens import inspect_token_dir

    report = inspect_token_dir(path, verify_checksums=not quick)
    for line in report.summary_lines():
        typer.echo(line)
    if report.problems:
        for problem in report.problems[:10]:
            typer.echo(f"  problem: {problem}", err=True)
        raise UserError(f"{path} is broken: {report.problems[0]}")


@app.command(name="demo-data")
def demo_data(
    out: Path = typer.Argument(..., help="Where to write the dataset (ImageNet layout under OUT/train)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rebuild OUT if it exists."),
) -> None:
    """Build the small real-photo demo dataset (8 classes x 4 photos) offline, from photos scikit-image ships."""
    from vqtok.data.default_dataset import build_default_dataset

    build_default_dataset(out, overwrite=overwrite)
    typer.echo(f"wrote the demo dataset to {out / 'train'}")
