"""Training run directories: where their checkpoints lie, and a run accepted wherever a checkpoint is expected.

RUN/checkpoints/step-XXXXXXXX/ holds one training checkpoint (state.pt and meta.json, written by
vqtok.train.checkpoint); `list_checkpoints` and `latest_checkpoint` find the complete ones.

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
import re
import sys
from pathlib import Path

from vqtok.errors import UserError

WEIGHTS_FILE = "model.safetensors"
STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "meta.json").is_file() and (p / "state.pt").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _is_checkpoint(path: Path) -> bool:
    return (path / WEIGHTS_FILE).is_file()


def resolve_checkpoint(path: str | Path, option: str = "--tokenizer", announce: bool = True) -> Path:
    """The checkpoint directory `path` names: itself, or RUN/final when `path` is a training run."""
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


__all__ = ["resolve_checkpoint", "checkpoint_dir", "list_checkpoints", "latest_checkpoint"]
