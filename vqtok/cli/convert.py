"""`vqtok convert`: official tokenizer / generator weights -> a vqtok checkpoint directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vqtok.cli.app import app
from vqtok.errors import UserError


@app.command(name="convert")
def convert(
    file: Path = typer.Argument(..., help="Official weights: .bin / .pt / .pth / .safetensors, or hf://OWNER/REPO[@REVISION]/FILE on the Hugging Face Hub (through its cache; HF_HUB_OFFLINE=1 reads the cache only)."),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to write."),
    arch: Optional[str] = typer.Option(None, "--arch", help="maskgit_vqgan, var_vqvae, llamagen_vq, rar, var_gpt or llamagen_gpt (default: detected from the keys)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow files that need full unpickling (only for files you trust)."),
    key: Optional[str] = typer.Option(None, "--key", help="Entry of a checkpoint dict to convert, e.g. ema (LlamaGen); default: model, ema, state_dict, module in that order."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it already exists."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="VAR generators: the vqtok multi-scale tokenizer checkpoint they were trained with."),
    heads: Optional[int] = typer.Option(None, "--heads", min=1, help="LlamaGen generators of a size outside the official table: the attention head count (the weights do not hold it)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", min=1, help="LlamaGen generators: tokens per image (256 for 256 px, 576 for 384 px); default: from an official file name (c2i_B_384.pt), else 256."),
) -> None:
    """Convert MaskGIT-VQGAN, VAR or LlamaGen (and RAR) weights into a vqtok checkpoint, atomically."""
    from vqtok.interop.convert import convert_checkpoint

    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    summary = convert_checkpoint(file, out, arch=arch, trust_pickle=trust_pickle, key=key, tokenizer=tokenizer,
                                 n_head=heads, block_size=tokens)
    details = ", ".join(f"{k} {v}" for k, v in summary.items() if k not in ("out", "arch", "kind"))
    typer.echo(f"wrote {summary['kind']} checkpoint {summary['out']} ({summary['arch']}{': ' + details if details else ''})")
