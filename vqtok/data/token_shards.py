"""Token shards: the output of `vqtok encode` and the input of `train-ar` (the format, described below).

A token directory holds `manifest.json`, `skipped.jsonl` and either webdataset tar shards
(`tokens-000000.tar`, ...: per sample `<key>.tokens.npy` of shape (views, tokens) in uint16, or uint32
above 65,536 codes, and `<key>.cls`) or one HDF5 file `tokens.h5` (datasets `tokens` (N, views,
tokens), `cls` (N,), `keys` (N,)) for random access.

Writing is crash-safe: each shard is written under a temporary name (unique per process) and renamed
when complete, and its count, sha256 and skipped inputs go to a small sidecar in `progress/` first, so
"the shard file exists" means "the shard is done". The manifest is written last, by one process, once
every shard is done; each of its `shards` entries carries the shard's `sha256`, which `vqtok inspect`
and `train-ar` check (manifests written before checksums existed have none and are range-checked only).
A full or read-only disk is a one-line user error and leaves no temporary file behind.

Reading (`open_token_dataset`) gives training an infinite, DDP-safe stream for tar shards (every rank
and worker resamples shards on its own, so none starves when there are fewer shards than workers) or a
map-style dataset for HDF5; both yield `(tokens, cls)` with one view per sample, and memory stays flat
(a bounded shuffle buffer; HDF5 rows read on demand).
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from vqtok.distributed import rank_and_world
from vqtok.errors import UserError
from vqtok.fs_errors import writing
from vqtok.weights import file_sha256

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"
PROGRESS_DIR = "progress"
H5_NAME = "tokens.h5"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds codebooks up to 65,536 codes; larger ones (18-bit LFQ) need uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def shard_name(index: int, fmt: str) -> str:
    return f"tokens-{index:06d}.tar" if fmt == "wds" else f"tokens-{index:06d}.h5"


def shard_path(out_dir: Path, index: int, fmt: str) -> Path:
    """Where a finished shard lives: tar shards in the output dir, HDF5 parts in progress/ until merged."""
    name = shard_name(index, fmt)
    return out_dir / name if fmt == "wds" else out_dir / PROGRESS_DIR / name


def sidecar_path(out_dir: Path, index: int) -> Path:
    return out_dir / PROGRESS_DIR / f"tokens-{index:06d}.json"


def shard_is_complete(out_dir: Path, index: int, fmt: str) -> bool:
    return shard_path(out_dir, index, fmt).is_file() and sidecar_path(out_dir, index).is_file()


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path):
            with open(tmp, "w") as fh:
                json.dump(obj, fh, indent=2)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(out_dir: Path) -> list[str]:
    """Delete the temporary files a killed `encode` left (`.tokens-*.tmp-*`, `.manifest.json.tmp-*`, ...);
    call only while holding the output's run lock. Returns their names."""
    removed = []
    for folder in (out_dir, out_dir / PROGRESS_DIR):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.name.startswith((".tokens", f".{MANIFEST}", f".{SKIPPED}")) and ".tmp" in p.name:
                p.unlink(missing_ok=True)
                removed.append(str(p.relative_to(out_dir)))
    return removed


def check_shard_checksum(path: Path, expected: str | None, digest: str | None = None) -> None:
    """Refuse a shard whose bytes differ from the sha256 the manifest recorded (None: an old manifest)."""
    if expected is None:
        return
    try:
        actual = digest if digest is not None else file_sha256(path)
    except OSError as exc:
        raise UserError(f"token shard {path} cannot be read ({exc.strerror or exc}); re-run `vqtok encode`") from None
    if actual != expected:
        raise UserError(
            f"token shard {path} does not match the sha256 in {MANIFEST} (the file was damaged or changed after "
            "encoding); re-run the same `vqtok encode` command into a fresh --out"
        )


VERIFIED = ".verified.json"


class ShardVerifications:
    """Which shards of a token directory were already verified, so a restart or resume does not hash and
    range-check unchanged shards again.

    An entry is keyed by the shard file's size, mtime and ctime, the sha256 the manifest records for it,
    and `check` (what was checked: dtype, shape, vocabulary, classes); a shard whose file or expectation
    changed in any of these is verified again. Kept in `<token dir>/.verified.json`, or, when that folder
    is read-only (a shared dataset), in `$XDG_CACHE_HOME/vqtok/verified/` (default ~/.cache) under a name
    derived from the folder's real path. A missing, unreadable or foreign record only means "verify".
    """

    VERSION = 1

    def __init__(self, root: str | Path, check: str):
        self.root, self.check = Path(root), check
        self.entries: dict[str, dict] = {}
        self.dirty = False
        for location in reversed(self.locations()):  # the token folder's record wins
            self.entries.update(self._read(location))

    def locations(self) -> list[Path]:
        import hashlib

        real = os.path.realpath(self.root)
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vqtok" / "verified"
        return [self.root / VERIFIED, cache / f"{hashlib.sha256(real.encode()).hexdigest()[:24]}.json"]

    def _read(self, location: Path) -> dict[str, dict]:
        try:
            record = json.loads(location.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(record, dict) or record.get("version") != self.VERSION or record.get("root") != os.path.realpath(self.root):
            return {}
        shards = record.get("shards")
        return {k: v for k, v in shards.items() if isinstance(v, dict)} if isinstance(shards, dict) else {}

    def _key(self, name: str, sha256: str | None) -> dict | None:
        try:
            st = os.stat(self.root / name)
        except OSError:
            return None
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "sha256": sha256,
                "check": self.check}

    def is_verified(self, name: str, sha256: str | None) -> bool:
        key = self._key(name, sha256)
        return key is not None and self.entries.get(name) == key

    def mark(self, name: str, sha256: str | None) -> None:
        key = self._key(name, sha256)
        if key is not None and self.entries.get(name) != key:
            self.entries[name] = key
            self.dirty = True

    def save(self) -> Path | None:
        """Write the record where it can be written (see the class docstring); None when nowhere can."""
        if not self.dirty:
            return None
        record = {"version": self.VERSION, "root": os.path.realpath(self.root), "shards": self.entries}
        for location in self.locations():
            try:
                location.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(location, record)
            except (OSError, UserError):
                continue
            self.dirty = False
            return location
        return None


class TokenShardWriter:
    """Writes one shard: `write(key, tokens, cls)` per sample, `skip(...)` per bad input, then `close()`.

    Samples go to `.<name>.tmp` (a webdataset TarWriter, or rows buffered for an HDF5 part); `close()`
    writes the sidecar, then renames the shard into place. A writer that is never closed leaves only
    a temporary file that the next run overwrites.
    """

    def __init__(self, out_dir: str | Path, index: int, fmt: str, dtype: np.dtype, views: int, tokens_per_view: int):
        import webdataset as wds

        self.out_dir = Path(out_dir)
        self.index, self.fmt, self.dtype = index, fmt, np.dtype(dtype)
        self.shape = (views, tokens_per_view)
        self.final = shard_path(self.out_dir, index, fmt)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        (self.out_dir / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")
        self.count = 0
        self.skipped: list[dict] = []
        self._rows: list[tuple[str, np.ndarray, int]] = []
        self._file = None
        self._tar = None
        if fmt == "wds":
            with writing(self.tmp):
                self._file = open(self.tmp, "wb")
            # mtime fixed so the same inputs give byte-identical shards, whichever rank or run wrote them.
            self._tar = wds.TarWriter(self._file, mtime=0.0)

    def write(self, key: str, tokens: np.ndarray, cls: int) -> None:
        if tokens.shape != self.shape or tokens.dtype != self.dtype:
            raise ValueError(f"tokens for {key} are {tokens.dtype}{tokens.shape}, expected {self.dtype}{self.shape}")
        if self._tar is not None:
            with writing(self.tmp):
                self._tar.write({"__key__": key, "tokens.npy": tokens, "cls": int(cls)})
        else:
            self._rows.append((key, tokens, int(cls)))
        self.count += 1

    def skip(self, key: str, source: str, reason: str) -> None:
        self.skipped.append({"key": key, "source": source, "reason": reason})

    def close(self) -> None:
        try:
            with writing(self.tmp):
                if self._tar is not None:
                    tar, self._tar = self._tar, None
                    tar.close()  # closes the file object too
                else:
                    self._write_h5_part()
                with open(self.tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            write_json_atomic(
                sidecar_path(self.out_dir, self.index),
                {"name": self.final.name, "count": self.count, "sha256": file_sha256(self.tmp), "skipped": self.skipped},
            )
            with writing(self.final):
                os.replace(self.tmp, self.final)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop an unfinished shard (an error, a full disk or a --strict stop): its temporary file is removed."""
        tar, self._tar = self._tar, None
        if tar is not None:
            try:
                tar.close()
            except (OSError, ValueError):  # a full disk fails the final flush too; the file goes anyway
                if self._file is not None:
                    try:
                        self._file.close()
                    except OSError:
                        pass
        self._rows = []
        self.tmp.unlink(missing_ok=True)

    def _write_h5_part(self) -> None:
        import h5py

        # Built in memory (a part is one shard's rows) and written with plain file I/O: the HDF5 library
        # crashes the process when a write fails on a full disk, a Python write raises an OSError instead.
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as f:
            n = len(self._rows)
            data = np.stack([r[1] for r in self._rows]) if n else np.zeros((0, *self.shape), self.dtype)
            f.create_dataset("tokens", data=data)
            f.create_dataset("cls", data=np.array([r[2] for r in self._rows], dtype=np.int64))
            f.create_dataset("keys", data=np.array([r[0] for r in self._rows], dtype=h5py.string_dtype()))
        self._rows = []
        with open(self.tmp, "wb") as fh:
            fh.write(buffer.getbuffer())


def merge_h5_parts(out_dir: Path, num_shards: int, dtype: np.dtype, shape: tuple[int, int], total: int) -> str:
    """Copy the per-shard HDF5 parts, in shard order, into one `tokens.h5` (one part in memory at a time);
    returns its sha256.

    The store is built as a temporary file in the same folder and renamed over `tokens.h5` only when
    complete, so a failure leaves any previous `tokens.h5` exactly as it was. Room is checked up front;
    if the disk still fills (or fails: EIO) mid-merge, the error is one line, the temporary is removed,
    and libhdf5 never sees a failed write (see `_GuardedFile`)."""
    final = out_dir / H5_NAME
    tmp = out_dir / f".{H5_NAME}.tmp-{os.getpid()}"
    _check_room_for(final, sum(shard_path(out_dir, k, "h5").stat().st_size for k in range(num_shards)) + (1 << 20))
    try:
        with writing(final):
            _merge_h5(tmp, out_dir, num_shards, dtype, shape, total)
            digest = file_sha256(tmp)
            os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest


def _check_room_for(path: Path, size: int) -> None:
    """Refuse up front when `size` bytes will not fit (free space or the file-size limit)."""
    import resource
    import shutil

    from vqtok.fs_errors import FilesystemError

    free = shutil.disk_usage(path.parent).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if free < size or (limit != resource.RLIM_INFINITY and limit < size):
        room = min(free, limit) if limit != resource.RLIM_INFINITY else free
        raise FilesystemError(
            f"cannot write {path}: it needs about {size / 1e6:.1f} MB and only {room / 1e6:.1f} MB fit (free space or "
            "the file-size limit); free some space and rerun the same command: it resumes where it stopped"
        )


class _GuardedFile(io.RawIOBase):
    """The file libhdf5 writes the merged store through (h5py's file-object driver).

    libhdf5 does not survive a failed write: the process crashes when the library shuts down. So the
    first OSError of a write, flush or truncate is recorded instead of raised, and from then on writes are
    accepted and dropped; the merge checks `error` after each part and raises it once the HDF5 file is
    closed, and the (abandoned) temporary file is removed."""

    def __init__(self, fh):
        super().__init__()
        self.fh = fh
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self.fh.readinto(buffer)

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if self.error is None:
            try:
                self.fh.write(data)
            except OSError as exc:
                self.error = exc
        return size

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.fh.seek(offset, whence)

    def tell(self) -> int:
        return self.fh.tell()

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self.fh.truncate(size)
            except OSError as exc:
                self.error = exc
        return self.fh.tell() if size is None else size

    def flush(self) -> None:
        if self.error is None:
            try:
                self.fh.flush()
            except OSError as exc:
                self.error = exc


def _open_merge_target(path: Path):
    return open(path, "w+b")


def _merge_h5(tmp: Path, out_dir: Path, num_shards: int, dtype: np.dtype, shape: tuple[int, int], total: int) -> None:
    import h5py

    with _open_merge_target(tmp) as fh:
        guard = _GuardedFile(fh)
        with h5py.File(guard, "w") as out:
            chunk_rows = max(1, min(total, 256))
            tokens = out.create_dataset("tokens", shape=(total, *shape), dtype=dtype, chunks=(chunk_rows, *shape) if total else None)
            cls = out.create_dataset("cls", shape=(total,), dtype=np.int64)
            keys = out.create_dataset("keys", shape=(total,), dtype=h5py.string_dtype())
            row = 0
            for index in range(num_shards):
                with h5py.File(shard_path(out_dir, index, "h5"), "r") as part:
                    n = part["tokens"].shape[0]
                    tokens[row : row + n] = part["tokens"][:]
                    cls[row : row + n] = part["cls"][:]
                    keys[row : row + n] = part["keys"][:]
                    row += n
                out.flush()  # this part's chunks reach the file now, so a full disk stops the merge here
                if guard.error is not None:
                    break
        if guard.error is not None:
            raise guard.error
        fh.flush()
        os.fsync(fh.fileno())


# ---------------------------------------------------------------------------------------------- reading


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"token directory {path} does not exist")
    mpath = path / MANIFEST
    if not mpath.is_file():
        hint = " (an unfinished encode: rerun the same `vqtok encode` command to finish it)" if (path / PROGRESS_DIR).is_dir() else ""
        raise UserError(f"{path} has no {MANIFEST}; it is not a finished `vqtok encode` output{hint}")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{mpath} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    for key in ("format", "version", "tokenizer", "views", "shards", "num_samples", "dtype"):
        if key not in manifest:
            raise UserError(f"{mpath} lacks the '{key}' entry; it was not written by `vqtok encode`")
    if manifest["format"] not in ("wds", "h5"):
        raise UserError(f"{mpath} has unknown format {manifest['format']!r} (expected wds or h5)")
    if manifest["version"] > FORMAT_VERSION:
        raise UserError(f"{mpath} is format version {manifest['version']}; this vqtok reads up to {FORMAT_VERSION}, so upgrade vqtok")
    return manifest


def iter_tar_samples(path: str | Path) -> Iterator[tuple[str, np.ndarray, int]]:
    """(key, tokens, cls) for each sample of one tar shard, in file order, one sample in memory at a time."""
    current: str | None = None
    fields: dict[str, bytes] = {}
    with tarfile.open(path, "r:") as tf:
        for member in tf:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            key, _, ext = base.partition(".")
            key = os.path.join(os.path.dirname(member.name), key)
            if current is not None and key != current:
                yield _decode_fields(current, fields)
                fields = {}
            current = key
            fields[ext] = tf.extractfile(member).read()
    if current is not None:
        yield _decode_fields(current, fields)


def _decode_fields(key: str, fields: dict[str, bytes]) -> tuple[str, np.ndarray, int]:
    if "tokens.npy" not in fields or "cls" not in fields:
        raise ValueError(f"sample {key} lacks tokens.npy or cls (has {sorted(fields)})")
    tokens = np.load(io.BytesIO(fields["tokens.npy"]), allow_pickle=False)
    return key, tokens, int(fields["cls"].decode())


def iter_samples(path: str | Path, manifest: dict | None = None) -> Iterator[tuple[str, np.ndarray, int]]:
    """Every sample of a token directory once, in shard order: (key, tokens (views, tokens), cls)."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    if manifest["format"] == "wds":
        for shard in manifest["shards"]:
            yield from iter_tar_samples(path / shard["name"])
        return
    import h5py

    with h5py.File(path / H5_NAME, "r") as f:
        n = f["tokens"].shape[0]
        for start in range(0, n, 256):
            tokens, cls = f["tokens"][start : start + 256], f["cls"][start : start + 256]
            keys = f["keys"][start : start + 256]
            for i in range(len(tokens)):
                yield _as_str(keys[i]), tokens[i], int(cls[i])


def _as_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pick_view(tokens: np.ndarray, view: str | int, rng: random.Random) -> np.ndarray:
    if view == "all":
        return tokens
    if view == "random":
        return tokens[rng.randrange(tokens.shape[0])]
    return tokens[int(view)]


class TokenShardStream(torch.utils.data.IterableDataset):
    """Training stream over tar shards: `(tokens int64 (T,) or (V, T), cls int64)` per sample.

    `resampled=True` (training): each rank and DataLoader worker draws shards at random with
    replacement from its own seeded RNG and never stops, so no rank runs dry or hangs when shards are
    fewer than ranks x workers; bound an epoch by steps in the trainer. Samples pass through a shuffle
    buffer of `shuffle_buffer` entries. `resampled=False`: one pass, shards dealt round-robin to
    (rank, worker) streams (for evaluation; a stream may be empty when shards are few).
    """

    def __init__(self, root: str | Path, manifest: dict, view: str | int = "random", resampled: bool = True,
                 shuffle_buffer: int = 1000, seed: int = 0):
        super().__init__()
        self.root = Path(root)
        self.shards = [str(self.root / s["name"]) for s in manifest["shards"] if s["count"] > 0]
        if not self.shards:
            raise UserError(f"{root} holds no samples")
        self.view, self.resampled, self.shuffle_buffer, self.seed = view, resampled, shuffle_buffer, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _stream_id(self) -> tuple[int, int]:
        rank, world = rank_and_world()
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nw + wid, world * nw

    def __iter__(self):
        sid, nstreams = self._stream_id()
        rng = random.Random(hash((self.seed, self.epoch, sid)) & 0xFFFFFFFF)
        if self.resampled:
            shard_iter = (rng.choice(self.shards) for _ in iter(int, 1))
        else:
            shard_iter = iter(self.shards[sid::nstreams])
        buffer: list[tuple[np.ndarray, int]] = []
        for shard in shard_iter:
            for _key, tokens, cls in iter_tar_samples(shard):
                item = (np.ascontiguousarray(_pick_view(tokens, self.view, rng)), cls)
                if self.shuffle_buffer <= 1:
                    yield _to_torch(item)
                    continue
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(item)
                    continue
                j = rng.randrange(len(buffer))
                buffer[j], item = item, buffer[j]
                yield _to_torch(item)
        rng.shuffle(buffer)
        for item in buffer:
            yield _to_torch(item)


def _to_torch(item: tuple[np.ndarray, int]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, cls = item
    return torch.from_numpy(tokens.astype(np.int64)), torch.tensor(cls, dtype=torch.long)


class TokenH5Dataset(torch.utils.data.Dataset):
    """Random-access dataset over `tokens.h5`; the file is opened lazily in each process (h5py handles
    do not survive fork). Use with a (Distributed)Sampler; a "random" view is drawn with torch's RNG,
    which DataLoader seeds per worker."""

    def __init__(self, root: str | Path, manifest: dict, view: str | int = "random"):
        super().__init__()
        self.path = Path(root) / H5_NAME
        if not self.path.is_file():
            raise UserError(f"{self.path} is missing; the token directory is incomplete")
        self.view = view
        self.length = int(manifest["num_samples"])
        self.num_views = len(manifest["views"])
        self._file = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._file is None:
            import h5py

            self._file = h5py.File(self.path, "r")
        if self.view == "all":
            tokens = self._file["tokens"][index]
        else:
            v = int(torch.randint(self.num_views, ()).item()) if self.view == "random" else int(self.view)
            tokens = self._file["tokens"][index, v]
        return torch.from_numpy(tokens.astype(np.int64)), torch.tensor(int(self._file["cls"][index]), dtype=torch.long)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None
        return state


def open_token_dataset(path: str | Path, view: str | int = "random", resampled: bool = True,
                       shuffle_buffer: int = 1000, seed: int = 0):
    """`(manifest, dataset)` for a `vqtok encode` output directory.

    `view`: "random" (one of the views per access: the ten-crop augmentation), "all" ((V, T) per
    sample) or a view index. Tar shards give a `TokenShardStream` (IterableDataset); HDF5 gives a
    `TokenH5Dataset` (map-style). Items are `(tokens int64, cls int64)`.
    """
    manifest = read_manifest(path)
    if isinstance(view, int) and not 0 <= view < len(manifest["views"]):
        raise UserError(f"view {view} is out of range: {path} has {len(manifest['views'])} views {manifest['views']}")
    if manifest["format"] == "h5":
        return manifest, TokenH5Dataset(path, manifest, view=view)
    return manifest, TokenShardStream(path, manifest, view=view, resampled=resampled, shuffle_buffer=shuffle_buffer, seed=seed)
