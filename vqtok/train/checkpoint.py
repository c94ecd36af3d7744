"""Training checkpoints: RUN/checkpoints/step-XXXXXXXX/{state.pt, meta.json}, atomic, last K kept.

`state.pt` is a `torch.save` of plain nested dicts/lists of tensors, numbers, strings and None (module
and optimizer state dicts, EMA shadows, RNG states as uint8 tensors), so it loads with
`torch.load(weights_only=True)`: no pickled objects. `meta.json` holds the step, bookkeeping and the
sha256 of state.pt (`state_sha256`), which loading checks; it is written inside the same atomic
directory, so a directory that exists is complete.

Old checkpoints are pruned by renaming them to `.step-N.pruning` first, so a kill mid-delete never leaves
a half-deleted `step-N` that looks like a checkpoint. `clean_leftovers` removes what a killed run can
leave behind (temporary `.step-N.tmp-*` dirs, `.pruning`/`.old` dirs, half-deleted step dirs of older
versions) when the run starts again.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqtok.errors import UserError
from vqtok.fs_errors import torch_save, writing
from vqtok.run_dirs import STEP_DIR, checkpoint_dir, latest_checkpoint, list_checkpoints  # noqa: F401 (re-exported)
from vqtok.weights import atomic_dir, file_sha256

LEFTOVER = re.compile(r"^\.(step-\d{8}|final)\.(tmp|old)-[0-9a-f]+$|^\.step-\d{8}\.pruning(-[0-9a-f]+)?$")


def write_checkpoint(run_dir: Path, step: int, state: dict[str, Any], meta: dict[str, Any], keep_last: int) -> Path:
    dest = checkpoint_dir(run_dir, step)
    with atomic_dir(dest) as tmp:
        torch_save(state, tmp / "state.pt")
        meta = {**meta, "state_sha256": file_sha256(tmp / "state.pt")}
        with writing(dest):
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if keep_last > 0:
        for old_step, old in list_checkpoints(run_dir)[:-keep_last]:
            prune = old.with_name(f".{old.name}.pruning")
            try:
                os.replace(old, prune)
            except OSError:
                continue
            shutil.rmtree(prune, ignore_errors=True)
    return dest


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    def refuse(why: str) -> UserError:
        return UserError(f"checkpoint {path} {why}; delete that directory to resume from an earlier checkpoint")

    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise refuse(f"has an unreadable meta.json ({_first_line(exc)})") from None
    if not isinstance(meta, dict):
        raise refuse("has a meta.json that is not a JSON object")
    recorded = meta.get("state_sha256")
    if recorded is not None and recorded != file_sha256(path / "state.pt"):
        raise refuse("is damaged: state.pt does not match the sha256 in its meta.json")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise refuse(f"cannot be read ({_first_line(exc)})") from None
    return state, meta


def clean_leftovers(run_dir: Path) -> list[str]:
    """Remove what a killed run left in `run_dir` (see module docstring); return what was removed.

    Call only while holding the run's lock: another live run's temporaries must not be touched.
    """
    removed = []
    for folder in (run_dir / "checkpoints", run_dir):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            half_deleted = (folder.name == "checkpoints" and STEP_DIR.match(p.name) and p.is_dir()
                            and not ((p / "meta.json").is_file() and (p / "state.pt").is_file()))
            if LEFTOVER.match(p.name) or half_deleted:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(str(p.relative_to(run_dir)) + (" (half-deleted)" if half_deleted else ""))
    return removed


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:120] if text else type(exc).__name__


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
