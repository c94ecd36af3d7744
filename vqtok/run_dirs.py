"""A training run directory accepted wherever a checkpoint is expected.

`vqtok train-tokenizer/train-ar --out RUN` leaves RUN/final (the weights) next to RUN/checkpoints/ (training
state). Every option that takes a checkpoint (`--tokenizer`, `--ckpt`, `--init`, `eval-tokenizer`,
`reconstruct`, `encode`) passes its path through `resolve_checkpoint`:

- an `hf://OWNER/REPO[@REV]/PATH` URL: its file or folder in the Hugging Face cache (vqtok/hub.py), then as below;
- a checkpoint directory (it holds model.safetensors) or any file: returned unchanged;
- a finished run (RUN/final is a checkpoint): RUN/final, announced on stderr;
- an unfinished run (checkpoints/ but no final/): a one-line UserError naming the latest checkpoint and how
  to finish the run;
- anything else (a missing path, a directory of something else): returned unchanged, so the loader's own
  message applies.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from vqtok.errors import UserError

WEIGHTS_FILE = "model.safetensors"


def _is_checkpoint(path: Path) -> bool:
    return (path / WEIGHTS_FILE).is_file()


def resolve_checkpoint(path: str | Path, option: str = "--tokenizer", announce: bool = True) -> Path:
    """The checkpoint directory `path` names: itself, or RUN/final when `path` is a training run."""
    from vqtok.train.checkpoint import latest_checkpoint

    path = Path(path)
    from vqtok.weights import local_source  # an hf:// URL: the file or folder in the Hub's cache

    path = local_source(path)
    if not path.is_dir() or _is_checkpoint(path):
        return path
    final = path / "final"
    if final.is_dir() and _is_checkpoint(final):
        if announce and int(os.environ.get("RANK", "0")) == 0:
            sys.stderr.write(f"{option} {path} is a run directory: using {final}\n")
            sys.stderr.flush()
        return final
    latest = latest_checkpoint(path)
    if latest is not None:
        raise UserError(
            f"{option} {path} is a training run that has not finished (no final/); its latest checkpoint is {latest} "
            f"(training state): finish the run with --resume auto, then pass {path}"
        )
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file():
        raise UserError(f"{option} {path} is a training run that has not finished and has no checkpoint yet (no final/)")
    return path


__all__ = ["resolve_checkpoint"]
