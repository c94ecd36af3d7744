"""`vqtok train-tokenizer DATA --config RECIPE [key=value ...] --out RUN_DIR [--resume auto]`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vqtok.cli.app import app, run_training
from vqtok.errors import UserError


@app.command(name="train-tokenizer")
def train_tokenizer_command(
    data: Path = typer.Argument(..., help="ImageNet-layout folder, flat image folder, or a folder of webdataset .tar shards."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Config overrides key.sub=value, e.g. train.steps=1000."),
    config: str = typer.Option(..., "--config", "-c", help="Recipe name (vqtok/recipes/tokenizer/NAME.yaml) or a YAML file."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: checkpoints, metrics.jsonl, previews, final/."),
    resume: Optional[str] = typer.Option(None, "--resume", help="'auto': continue from the latest checkpoint in --out."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps (default: best available)."),
    lpips_weights: Optional[str] = typer.Option(
        None, "--lpips-weights", help="VGG16 ImageNet weights file (vgg16-397923af.pth); default: the torch hub cache."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Resolve everything, print the plan, write RUN/plan.json and RUN/config.yaml; train nothing."
    ),
    init: Optional[Path] = typer.Option(
        None, "--init",
        help="Fine-tune from: a vqtok run dir or checkpoint (with discriminator and optimizer states), a tokenizer "
             "checkpoint dir, or official MaskGIT-VQGAN / VAR / LlamaGen weights. Decoder only: train.freeze=encoder,quantizer.",
    ),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow an --init file that needs full unpickling (only files you trust)."),
) -> None:
    """Train a discrete image tokenizer (VQGAN, FSQ, LFQ, multi-scale VQ) with LPIPS and GAN losses."""
    from vqtok.train.tokenizer_task import train_tokenizer

    if resume not in (None, "auto"):
        raise UserError(f"--resume takes 'auto' (continue from the latest checkpoint in --out), got '{resume}'")
    if dry_run:
        from vqtok.train.plan import dry_run_tokenizer

        dry_run_tokenizer(data, out, config=config, overrides=list(overrides or []), device=device, lpips_weights=lpips_weights)
        return
    run_training(
        lambda: train_tokenizer(
            data, config, out, overrides=list(overrides or []), resume=resume == "auto",
            device=device, lpips_weights=lpips_weights, init=init, trust_pickle=trust_pickle,
        ),
        "tokenizer",
    )
