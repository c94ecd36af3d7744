"""The one way to read and write weights and model checkpoint directories.

Reading is safe by default: `.safetensors` files are tensors only, and every other file goes through
`torch.load(weights_only=True)`, which refuses arbitrary pickled objects. A file that needs full
unpickling (an old LlamaGen checkpoint holding an `argparse.Namespace`, say) is refused with a message
naming `--trust-pickle` (only for commands that have that flag); only then is `weights_only=False` used.
A file that is neither safetensors nor a torch file is "not a weight file (unrecognised content)".

Integrity: every model checkpoint records a content hash of its weights in its identity file `hash`
(`state_dict_sha256`, for tokenizers and generators alike) and its loader checks it, so a
damaged or edited checkpoint is refused in one line instead of loading silently different weights.

Sources: wherever a weights file or checkpoint directory is read, an `hf://OWNER/REPO[@REV]/PATH` URL
may stand for it (`local_source`): it is fetched through the Hugging Face Hub's cache (vqtok/hub.py).

Writing is atomic: a checkpoint directory is built under a temporary name beside its destination and
renamed into place, so a crash never leaves a half-written checkpoint where a good one was.

Model checkpoint directory (the contract every checkpoint kind follows):

    model.safetensors   weights (EMA weights when the run kept an EMA)
    config.yaml         the config that rebuilds the model
    <kind>.json         identity: tokenizer.json or generator.json (with the weights' `hash`)

`--overwrite` replaces only a directory that holds one of these identity files (a vqtok checkpoint):
never a dataset or any other directory that happens to be named.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch

from vqtok.errors import UserError
from vqtok.fs_errors import filesystem_error, safetensors_os_error, writing

TRUST_FLAG = "--trust-pickle"
MODEL_MARKERS = ("tokenizer.json", "generator.json")  # identity files: a directory vqtok made


def local_source(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local path of a weights source: `source` itself, or for an `hf://` URL its file (or folder) in
    the Hugging Face cache, downloaded first unless HF_HUB_OFFLINE=1 (then the cache must hold it)."""
    from vqtok.hub import is_hub_url

    if is_hub_url(source):
        from vqtok.hub import resolve_hub_path

        return resolve_hub_path(source, cache_dir=cache_dir)
    return Path(source)


def load_state_dict_file(path: str | Path, trust_pickle: bool | None = None, key: str | None = None) -> dict[str, torch.Tensor]:
    """Load a flat `{name: tensor}` dict from .safetensors / .bin / .pt / .pth, safely.

    `trust_pickle`: True allows full unpickling; False refuses it and names `--trust-pickle`; None (a
    command without that flag) refuses it without suggesting a flag the command does not have.

    `key` picks a nested entry (LlamaGen keeps weights under `checkpoint["model"]`); when it is None and
    the file holds a dict whose values are not all tensors, the usual containers are tried in order:
    "model", "ema", "state_dict", "module". `path` may be an `hf://` URL (see `local_source`).
    """
    path = local_source(path)
    if not path.exists():
        raise UserError(f"weights file {path} does not exist")
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            path = path / "model.safetensors"
        else:
            raise UserError(f"{path} is a directory without model.safetensors; pass the weights file itself")
    if path.stat().st_size == 0:
        raise UserError(f"weights file {path} is empty")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise UserError(f"weights file {path} is not a valid safetensors file ({exc})") from None
    if not _looks_like_torch_file(path):
        raise UserError(f"{path} is not a weight file (unrecognised content: neither safetensors nor a torch checkpoint)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            hint = f"; if you trust this file, pass {TRUST_FLAG}" if trust_pickle is False else ""
            raise UserError(f"{path} contains pickled Python objects that vqtok will not load{hint}") from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc2:  # noqa: BLE001 - any failure here is an unreadable file
            raise UserError(f"could not read weights file {path}: {exc2}") from None
        del exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"could not read weights file {path}: it is truncated or not a torch file ({_first_line(exc)})") from None
    return _extract_state_dict(obj, path, key)


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors content under another name (a `.bin` from the Hub): an 8-byte header length, then JSON."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def _looks_like_torch_file(path: Path) -> bool:
    """A torch checkpoint is a zip archive (torch >= 1.6) or a pickle stream (the legacy format, protocol 2+)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise UserError(f"cannot read weights file {path} ({exc.strerror or exc})") from None
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


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
    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as exc:  # SafetensorError wraps the OSError of a full or read-only disk
        os_error = safetensors_os_error(exc)
        err = filesystem_error(os_error, path) if os_error is not None else None
        if err is None:
            raise
        raise err from None


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and raw bytes of every tensor, in sorted key order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tensor_bytes_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the raw bytes of every tensor in key order (no names, dtypes or shapes): the weights hash
    tokenizer checkpoints recorded before `state_dict_sha256` served every checkpoint; it is only checked,
    never written."""
    digest = hashlib.sha256()
    for key in state:
        t = state[key].detach().to("cpu").contiguous().reshape(-1)
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def same_weights(recorded: str | None, identity: dict) -> bool:
    """Whether a recorded weights hash names the weights an identity describes (its `hash`, or the earlier
    form `legacy_hash` a checkpoint loaded from an older file also carries). No recorded hash: True."""
    return not recorded or recorded in (identity.get("hash"), identity.get("legacy_hash"))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_foreign_dir(dest: str | Path, markers: tuple[str, ...], what: str, flag: str = "--overwrite") -> None:
    """Refuse to replace `dest` unless it is missing, empty, or holds one of `markers` (files the
    command that made it writes): `--overwrite` must never delete a dataset or an unrelated folder."""
    dest = Path(dest)
    if not dest.exists():
        return
    if not dest.is_dir():
        raise UserError(f"{dest} is a file; pass a directory")
    if any(dest.iterdir()) and not any((dest / m).is_file() for m in markers):
        raise UserError(
            f"{dest} is not a {what} (it has no {' or '.join(markers)}); {flag} only replaces a directory "
            "vqtok made, so choose another output path"
        )


@contextlib.contextmanager
def atomic_dir(dest: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory next to `dest`; on success it replaces `dest` in one rename.

    On an exception the temporary directory is removed and `dest` is left exactly as it was.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise UserError(f"{dest} already exists; pass --overwrite to replace it")
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    with writing(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    try:
        yield tmp
        with writing(dest):
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
    """Write a model checkpoint directory atomically (see module docstring). An existing `dest` is
    replaced only when it is a vqtok checkpoint."""
    dest = Path(dest)
    refuse_foreign_dir(dest, MODEL_MARKERS, "vqtok checkpoint")
    with atomic_dir(dest) as tmp:
        save_safetensors(state, tmp / "model.safetensors", metadata={"format": "pt"})
        with writing(dest):
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / identity_name).write_text(json.dumps(identity, indent=2) + "\n")
    return dest


def read_model_dir(path: str | Path, identity_name: str) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    """Read (state dict, config YAML text, identity dict) from a checkpoint directory (or its hf:// URL)."""
    path = local_source(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise UserError(f"checkpoint {path} is a file; pass its directory (made by vqtok) or run `vqtok convert` first")
    for name in ("model.safetensors", "config.yaml", identity_name):
        if not (path / name).is_file():
            raise UserError(f"checkpoint {path} has no {name}; is it a vqtok {identity_name.split('.')[0]} checkpoint?")
    try:
        identity = json.loads((path / identity_name).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path / identity_name} is not valid JSON") from None
    if not isinstance(identity, dict):
        raise UserError(f"{path / identity_name} is not a vqtok identity file (expected a JSON object)")
    try:
        config_text = (path / "config.yaml").read_text()
    except UnicodeDecodeError:
        raise UserError(f"{path / 'config.yaml'} is not a text file; the checkpoint is damaged") from None
    return load_state_dict_file(path / "model.safetensors"), config_text, identity


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
