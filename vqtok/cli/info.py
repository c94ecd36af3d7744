"""`vqtok info`: versions, the device that would be used, and the registered presets and recipes."""

from __future__ import annotations

import platform

from vqtok.cli.app import app


@app.command()
def info() -> None:
    """Print versions, the device vqtok would use (CUDA / MPS / CPU) and the registered presets."""
    import torch
    import torchvision
    from rich.console import Console
    from rich.table import Table

    import vqtok
    from vqtok.config import list_recipes
    from vqtok.device import describe_device, pick_device
    from vqtok.ar.families import FAMILIES
    from vqtok.tokenizer.presets import PRESETS as TOKENIZER_PRESETS

    console = Console()
    table = Table(show_header=False, box=None)
    table.add_row("vqtok", vqtok.__version__)
    table.add_row("python", platform.python_version())
    table.add_row("torch", torch.__version__)
    table.add_row("torchvision", torchvision.__version__)
    table.add_row("device", describe_device(pick_device()))
    table.add_row("cuda available", str(torch.cuda.is_available()))
    table.add_row("tokenizer presets", ", ".join(sorted(TOKENIZER_PRESETS)) or "-")
    for family in FAMILIES.values():
        table.add_row(f"{family.name} presets", ", ".join(family.presets) or "-")
    for kind in ("tokenizer", "ar"):
        table.add_row(f"{kind} recipes", ", ".join(list_recipes(kind)) or "-")
    console.print(table)
