"""`vqtok reconstruct`, `vqtok eval-tokenizer` and `vqtok eval-fid`: thin wrappers over vqtok.eval."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from vqtok.cli.app import app

console = Console()

# options every evaluation command takes, declared once
DEVICE_OPTION = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps (default: best available).")
INCEPTION_OPTION = typer.Option(None, "--inception-weights",
                                help="weights-inception-2015-12-05-6726825d.pth for FID (default: the torch hub cache).")


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


@app.command(name="reconstruct")
def reconstruct(
    images: List[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="Tokenizer checkpoint directory."),
    out: Path = typer.Option(..., "--out", help="Output folder for side-by-side PNGs, grid.png and metrics.json."),
    size: Optional[int] = typer.Option(None, "--size", help="Center-crop size (default: the tokenizer's resolution)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    device: Optional[str] = DEVICE_OPTION,
) -> None:
    """ADM-center-crop, encode and decode images; write original | reconstruction PNGs and print PSNR/SSIM.

    Files that exist but do not decode are skipped with a warning; a missing path is an error.
    """
    from vqtok.device import pick_device
    from vqtok.eval.tokenizer_eval import reconstruct_images
    from vqtok.run_dirs import resolve_checkpoint
    from vqtok.tokenizer.tokenizer import load_tokenizer

    dev = pick_device(device)
    tokenizer = resolve_checkpoint(tokenizer)
    tok = load_tokenizer(tokenizer, device=dev)
    report = reconstruct_images(tok, images, out, size=size, device=dev, batch_size=batch_size)
    table = Table(title=f"reconstruction at {report.size}px")
    table.add_column("image")
    table.add_column("PSNR (dB)", justify="right")
    table.add_column("SSIM", justify="right")
    for score in report.images:
        table.add_row(score.name, _fmt(score.psnr, 2), _fmt(score.ssim))
    table.add_section()
    table.add_row(f"mean of {len(report.images)}", _fmt(report.mean_psnr, 2), _fmt(report.mean_ssim))
    console.print(table)
    if report.skipped:
        console.print(f"skipped {len(report.skipped)} file(s) that could not be decoded (listed in metrics.json)")
    console.print(f"wrote {len(report.images)} side-by-side PNGs and {report.grid} to {out}")


@app.command(name="eval-tokenizer")
def eval_tokenizer(
    data: Path = typer.Argument(..., help="Image folder, ImageNet root (uses val/ when present) or image .tar shards."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="Tokenizer checkpoint directory."),
    num: Optional[int] = typer.Option(None, "--num-images", help="Evaluate only the first N images."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    workers: int = typer.Option(2, "--workers", min=0, help="Image decoding worker processes."),
    lpips_weights: Optional[Path] = typer.Option(None, "--lpips-weights", help="VGG16 weights for LPIPS (default: torch hub cache)."),
    inception_weights: Optional[Path] = INCEPTION_OPTION,
    fid: bool = typer.Option(True, "--fid/--no-fid", help="Compute rFID when the Inception weights are available."),
    lpips: bool = typer.Option(True, "--lpips/--no-lpips", help="Compute LPIPS when the VGG16 weights are available."),
    report: Optional[Path] = typer.Option(None, "--report", help="JSON report path (default: CKPT.eval.json beside the checkpoint folder)."),
    device: Optional[str] = DEVICE_OPTION,
) -> None:
    """PSNR, SSIM, LPIPS, codebook usage/perplexity (per scale) and rFID of a tokenizer on an image set."""
    from vqtok.device import pick_device
    from vqtok.eval.tokenizer_eval import TokenizerEvalOptions, evaluate_tokenizer, write_report
    from vqtok.run_dirs import resolve_checkpoint
    from vqtok.tokenizer.tokenizer import load_tokenizer

    dev = pick_device(device)
    tokenizer = resolve_checkpoint(tokenizer)
    tok = load_tokenizer(tokenizer, device=dev)
    opts = TokenizerEvalOptions(
        data=str(data), num=num, batch_size=batch_size, workers=workers,
        lpips_weights=str(lpips_weights) if lpips_weights else None,
        inception_weights=str(inception_weights) if inception_weights else None,
        device=str(dev), fid=fid, lpips=lpips,
    )
    result = evaluate_tokenizer(tok, opts)
    path = write_report(result, report or tokenizer.with_name(tokenizer.name + ".eval.json"))

    _print_tokenizer_eval(result, tokenizer, path)


@app.command(name="eval-fid")
def eval_fid(
    samples: Path = typer.Argument(..., help="Generated images: ADM .npz (arr_0 uint8 NHWC) or a folder of PNG/JPEG."),
    ref: Path = typer.Option(..., "--ref", help="Reference: ADM .npz (images and/or precomputed mu/sigma), stats .npz, or a folder."),
    inception_weights: Optional[Path] = INCEPTION_OPTION,
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    cache_ref: bool = typer.Option(False, "--cache-ref", help="Cache the reference mu/sigma as REF.inception-stats.npz and reuse it."),
    precision_recall: bool = typer.Option(False, "--precision-recall", help="Also compute precision/recall (needs reference images)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON."),
    device: Optional[str] = DEVICE_OPTION,
) -> None:
    """FID and Inception Score with torch-fidelity's port of the TF Inception (close to, not identical with, the ADM evaluator)."""
    from vqtok.device import pick_device
    from vqtok.eval.fid import evaluate_fid
    from vqtok.eval.progress import image_progress

    result = evaluate_fid(
        samples, ref, inception_weights=inception_weights, batch_size=batch_size, device=pick_device(device),
        cache_ref=cache_ref, with_precision_recall=precision_recall, progress_factory=image_progress,
    )
    table = Table(title=f"{samples} vs {ref}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("FID", _fmt(result.fid, 3))
    table.add_row("Inception Score", f"{result.inception_score:.3f} ± {result.inception_score_std:.3f}")
    if result.precision is not None:
        table.add_row("precision", _fmt(result.precision))
        table.add_row("recall", _fmt(result.recall))
    table.add_row("samples", str(result.num_samples))
    table.add_row("reference", result.reference_stats)
    console.print(table)
    for note in result.notes:
        console.print(f"note: {note}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
        console.print(f"wrote {json_out}")


def _print_tokenizer_eval(result, tokenizer: Path, path: Path) -> None:
    """The eval-tokenizer summary table, what was skipped, and where the report is."""
    table = Table(title=f"{tokenizer} on {result.num_images} images at {result.resolution}px")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("PSNR (dB)", _fmt(result.psnr, 2))
    table.add_row("SSIM", _fmt(result.ssim))
    table.add_row("LPIPS", _fmt(result.lpips) if result.lpips is not None else "skipped")
    table.add_row("rFID", _fmt(result.rfid, 3) if result.rfid is not None else "skipped")
    cb = result.codebook
    table.add_row("codebook usage", f"{cb['usage']:.2%} ({cb['codes_used']}/{cb['vocab_size']})")
    table.add_row("perplexity", f"{cb['perplexity']:.1f} ({cb['entropy_bits']:.2f} bits)")
    for scale in cb.get("per_scale", []):
        table.add_row(f"  scale {scale['scale']}", f"usage {scale['usage']:.2%}, perplexity {scale['perplexity']:.1f}")
    console.print(table)
    if result.skipped:
        console.print(f"skipped: {', '.join(result.skipped)} (the reasons are printed above and kept in the report)")
    if result.num_skipped:
        console.print(f"{result.num_skipped} image(s) could not be decoded and were skipped (listed in the report)")
    console.print(f"report: {path}")
