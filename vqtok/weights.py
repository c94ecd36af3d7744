"""The one way to read and write weights and model checkpoint directories.

Reading is safe by default: `.safetensors` files are tensors only, and every other file goes through
`torch.load(weights_only=True)`, which refuses arbitrary pickled objects. A file that needs full
unpickling (an old LlamaGen checkpoint holding an `argparse.Namespace`, say) is refused with a message
naming `--trust-pickle`; only then is `weights_only=False` used.

Writing is atomic: a checkpoint directory is built under a temporary name beside its destination and
renamed into place, so a crash never leaves a half-written checkpoint where a good one was.

Model checkpoint directory (the contract in DESIGN.md):

    model.safetensors   weights (EMA weights when the run kept an EMA)
    config.yaml         the config that rebuilds the model
    <kind>.json         identity: tokenizer.json or generator.json
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch

from vqtok.errors import UserError

TRUST_FLAG = "--trust-pickle"


def load_state_dict_file(path: str | Path, trust_pickle: bool = False, key: str | None = None) -> dict[str, torch.Tensor]:
    """Load a flat `{name: tensor}` dict from .safetensors / .bin / .pt / .pth, safely.

    `key` picks a nested entry (LlamaGen keeps weights under `checkpoint["model"]`); when it is None and
    the file holds a dict whose values are not all tensors, the usual containers are tried in order:
    "model", "ema", "state_dict", "module".
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"weights file {path} does not exist")
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            path = path / "model.safetensors"
        else:
            raise UserError(f"{path} is a directory without model.safetensors; pass the weights file itself")
    if path.stat().st_size == 0:
        raise UserError(f"weights file {path} is empty")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise UserError(f"weights file {path} is not a valid safetensors file ({exc})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise UserError(
                f"{path} contains pickled Python objects that vqtok will not load by default; "
                f"if you trust this file, pass {TRUST_FLAG}"
            ) from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001 - any failure here is an unreadable file
            raise UserError(f"could not read weights file {path}: {exc2}") from None
        del exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"could not read weights file {path}: it is truncated or not a torch file ({_first_line(exc)})") from None
    return _extract_state_dict(obj, path, key)


def _extract_state_dict(obj: Any, path: Path, key: str | None) -> dict[str, torch.Tensor]:
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            raise UserError(f"{path} has no entry '{key}'")
        obj = obj[key]
    elif isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for candidate in ("model", "ema", "state_dict", "module"):
            if isinstance(obj.get(candidate), dict):
                obj = obj[candidate]
                break
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path} does not hold a state dict of tensors")
    out = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not out:
        raise UserError(f"{path} does not hold a state dict of tensors")
    return out


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata=metadata)


@contextlib.contextmanager
def atomic_dir(dest: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory next to `dest`; on success it replaces `dest` in one rename.

    On an exception the temporary directory is removed and `dest` is left exactly as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not overwrite:
        raise UserError(f"{dest} already exists; pass --overwrite to replace it")
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_dir(tmp)
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dest: Path) -> None:
    """Move the finished directory `src` to `dest`, replacing an old `dest` only at the very end."""
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
        os.replace(src, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dest)


def save_model_dir(
    dest: str | Path,
    state: dict[str, torch.Tensor],
    config_yaml: str,
    identity_name: str,
    identity: dict[str, Any],
) -> Path:
    """Write a model checkpoint directory atomically (see module docstring)."""
    dest = Path(dest)
    with atomic_dir(dest) as tmp:
        save_safetensors(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.yaml").write_text(config_yaml)
        (tmp / identity_name).write_text(json.dumps(identity, indent=2) + "\n")
    return dest


def read_model_dir(path: str | Path, identity_name: str) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """Read (state dict, config YAML text, identity dict) from a checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise UserError(f"checkpoint {path} is a file; pass its directory (made by vqtok) or run `vqtok convert` first")
    for name in ("model.safetensors", "config.yaml", identity_name):
        if not (path / name).is_file():
            raise UserError(f"checkpoint {path} has no {name}; is it a vqtok {identity_name.split('.')[0]} checkpoint?")
    try:
        identity = json.loads((path / identity_name).read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path / identity_name} is not valid JSON") from None
    return load_state_dict_file(path / "model.safetensors"), (path / "config.yaml").read_text(), identity


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
