"""Training checkpoints: RUN/checkpoints/step-XXXXXXXX/{state.pt, meta.json}, atomic, last K kept.

`state.pt` is a `torch.save` of plain nested dicts/lists of tensors, numbers, strings and None (module
and optimizer state dicts, EMA shadows, RNG states as uint8 tensors), so it loads with
`torch.load(weights_only=True)`: no pickled objects. `meta.json` holds the step and bookkeeping; it is
written inside the same atomic directory, so a directory that exists is complete.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqtok.errors import UserError
from vqtok.weights import atomic_dir

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


def write_checkpoint(run_dir: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep_last: int) -> Path:
    dest = checkpoint_dir(run_dir, step)
    with atomic_dir(dest) as tmp:
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if keep_last > 0:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return dest


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        meta = json.loads((path / "meta.json").read_text())
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, json.JSONDecodeError, RuntimeError) as exc:
        raise UserError(f"checkpoint {path} cannot be read ({str(exc).splitlines()[0][:120]}); delete it to resume from an earlier one") from None
    return state, meta


# -- RNG states as plain tensors ----------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_version": py_version,
        "python_gauss": py_gauss,
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(int(x) for x in state["python"].tolist()), state["python_gauss"]))
    np.random.set_state((
        "MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
        state["numpy_has_gauss"], state["numpy_gauss"],
    ))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
