"""`vqtok train-ar TOKENS_DIR --tokenizer CKPT [--arch rar] --preset rar-b --anneal START END [key=value ...] --out RUN_DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vqtok.cli.app import app, run_training
from vqtok.errors import UserError


@app.command(name="train-ar")
def train_ar_command(
    tokens: Path = typer.Argument(..., help="Token directory written by `vqtok encode` (manifest.json + shards)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Config overrides key.sub=value, e.g. train.batch_size=256."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="The tokenizer checkpoint the tokens were encoded with."),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory: checkpoints, metrics.jsonl, previews, final/."),
    arch: Optional[str] = typer.Option(
        None, "--arch", help="Generator family (the recipe's arch key; default rar). Its recipe types the model section."
    ),
    preset: Optional[str] = typer.Option(None, "--preset", help="Generator size of the family: rar-b|l|xl|xxl|tiny, var-d16|d20|d24|d30|tiny, llamagen-b|l|xl|xxl|3b|tiny."),
    anneal: Optional[tuple[float, float]] = typer.Option(
        None, "--anneal", help="START END of permutation annealing: r=1 before START, linear to 0 at END."
    ),
    anneal_unit: Optional[str] = typer.Option(None, "--anneal-unit", help="Unit of --anneal: epochs (passes over the images) or steps."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Training length in epochs (one pass over the source images)."),
    order: Optional[str] = typer.Option(
        None, "--order", help="Scan order annealed to and sampled in: raster, spiral-in, spiral-out, z-curve, subsample, alternate."
    ),
    config: Optional[str] = typer.Option(
        None, "--config", "-c", help="Recipe name (vqtok/recipes/ar/NAME.yaml) or a YAML file; default: rar-b paper settings."
    ),
    resume: Optional[str] = typer.Option(None, "--resume", help="'auto': continue from the latest checkpoint in --out."),
    init: Optional[Path] = typer.Option(
        None, "--init", help="Start from these weights: a generator checkpoint dir or an official RAR .bin (fine-tuning)."
    ),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow an --init file that needs full unpickling (only files you trust)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N or mps (default: best available)."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Resolve everything, print the plan, write RUN/plan.json and RUN/config.yaml; train nothing."
    ),
) -> None:
    """Train a generator on token shards (RAR: with permutation annealing)."""
    from vqtok.train.ar_task import cli_overrides, train_ar

    if resume not in (None, "auto"):
        raise UserError(f"--resume takes 'auto' (continue from the latest checkpoint in --out), got '{resume}'")
    if anneal_unit not in (None, "epochs", "steps"):
        raise UserError(f"--anneal-unit must be epochs or steps, got '{anneal_unit}'")
    flags = cli_overrides(preset, anneal, anneal_unit, epochs, order, arch)
    if dry_run:
        from vqtok.train.plan import dry_run_ar

        dry_run_ar(tokens, tokenizer, out, config=config, overrides=flags + list(overrides or []), device=device)
        return
    run_training(
        lambda: train_ar(
            tokens, tokenizer, out, config=config, overrides=flags + list(overrides or []), resume=resume == "auto",
            device=device, init=init, trust_pickle=trust_pickle,
        ),
        "generator",
    )
