"""Token shards as a random-access dataset for `train-ar`: exact epochs, exact resume, any number of ranks.

`vqtok encode` writes webdataset tar shards (or one HDF5 file). A streaming reader cannot restart
mid-epoch without re-reading everything before the resume point, and its per-rank streams make a
2-rank run read different samples than a 1-rank run. So train-ar reads the shards by position:

- tar shards: one scan of the tar headers at start-up records, per sample, where its `tokens.npy`
  bytes lie (shard, offset, size) and its class: about 20 bytes per sample (26 MB for ImageNet), held
  in numpy arrays that DataLoader workers share copy-on-write. Tokens are read on demand with one
  `pread` each, so memory does not grow with the dataset. HDF5 rows are read on demand as well.
- batches come from `StreamBatchSampler` (vqtok/train/sampler.py): global slot p of the run is image
  `perm(seed, epoch)[p % N]` of epoch p // N, and rank r of W takes the r-th 1/W of each global batch.
  No rank can run dry (the stream is endless and every rank gets exactly B/W samples per step), every
  epoch is one pass over the source images, and the samples of step s are a function of (seed, s) alone.
- the view (one of the ten crops) of image i in epoch e is a hash of (seed, e, i): a fresh random view per
  pass, identical on resume and whatever the number of ranks or workers.

Before training touches a shard it is verified once, in the same start-up pass (so the check costs nothing
per step): its sha256 against the manifest (when the manifest has one; older manifests are range-checked
only, with a note), every sample's npy header (dtype and shape) and token range [0, vocab_size), and every
class label. A damaged shard is one line naming the shard and the sample, before any weight is updated.
The result is remembered per shard (`ShardVerifications`: keyed by the file's size, mtime and ctime and the
manifest's sha256), so a restart or resume re-verifies only shards that changed; under torchrun rank 0
verifies and the other ranks take its verdict (a refusal stops every rank with the same line).
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vqtok.data.token_shards import MANIFEST, ShardVerifications, TokenH5Dataset, check_shard_checksum
from vqtok.errors import UserError

_REENCODE = "re-run `vqtok encode` into a fresh --out"

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """A well-mixed 64-bit hash of integers: independent-looking streams from (seed, purpose, step, ...)."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (v & _MASK64))
    return h


def view_for(seed: int, epoch: int, index: int, num_views: int) -> int:
    """The crop view image `index` uses in `epoch`: uniform, stateless, the same on every rank and resume."""
    return mix_seed(seed, epoch, index) % num_views


class TarTokens(torch.utils.data.Dataset):
    """Random access to the samples of webdataset token shards: item i -> (tokens (views, T) ndarray, cls)."""

    def __init__(self, root: str | Path, manifest: dict):
        self.root = Path(root)
        self.names = [s["name"] for s in manifest["shards"]]
        expect = SampleCheck.from_manifest(manifest)
        _note_missing_checksums(self.root, manifest)
        verdict = None
        shard_ids, offsets, sizes, classes = [], [], [], []
        if _is_verifier():
            done = ShardVerifications(self.root, expect.fingerprint)
            try:
                scans = [self._scan(shard, expect, done) for shard in manifest["shards"]]
            except UserError as exc:
                verdict = str(exc)
            finally:
                done.save()  # the shards verified before a damaged one stay verified
            _share_verdict(verdict)
        else:  # rank > 0: rank 0 verified the same files; only the index is read here
            _share_verdict(None)
            scans = [self._scan(shard, None, None) for shard in manifest["shards"]]
        for sid, (o, s, c) in enumerate(scans):
            shard_ids.append(np.full(len(o), sid, dtype=np.int32))
            offsets.append(np.asarray(o, dtype=np.int64))
            sizes.append(np.asarray(s, dtype=np.int32))
            classes.append(np.asarray(c, dtype=np.int32))
        self.shard_ids = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32)
        self.offsets = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
        self.sizes = np.concatenate(sizes) if sizes else np.zeros(0, np.int32)
        self.classes = np.concatenate(classes) if classes else np.zeros(0, np.int32)
        self._fds: dict[int, int] = {}

    def _scan(self, shard: dict, expect: "SampleCheck | None", done: ShardVerifications | None):
        """(offsets, sizes, classes) of one shard; verified against `expect` unless `done` says it already was."""
        name, sha256 = shard["name"], shard.get("sha256")
        verify = expect is not None and done is not None and not done.is_verified(name, sha256)
        o, s, c = _scan_tar(self.root / name, expect if verify else None, sha256 if verify else None)
        if len(o) != int(shard["count"]):
            raise UserError(
                f"shard {self.root / name} holds {len(o)} samples but the manifest says {shard['count']}; "
                "the token directory is damaged, so re-run `vqtok encode`"
            )
        if verify:
            done.mark(name, sha256)
        return o, s, c

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        sid = int(self.shard_ids[index])
        fd = self._fds.get(sid)
        if fd is None:  # opened lazily in each process: descriptors do not survive DataLoader's fork
            fd = self._fds[sid] = os.open(self.root / self.names[sid], os.O_RDONLY)
        data = os.pread(fd, int(self.sizes[index]), int(self.offsets[index]))
        return np.load(io.BytesIO(data), allow_pickle=False), int(self.classes[index])

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


@dataclass(frozen=True)
class SampleCheck:
    """What every sample of a token directory must be: its tokens' dtype and (views, T) shape, the
    vocabulary they index, and the class range (-1 allowed only for unlabelled data)."""

    dtype: np.dtype
    shape: tuple[int, int]
    vocab_size: int
    num_classes: int

    @property
    def fingerprint(self) -> str:
        """What a verification checked, as recorded with it: another expectation means verify again."""
        return f"{self.dtype.name} {list(self.shape)} vocab {self.vocab_size} classes {self.num_classes}"

    @classmethod
    def from_manifest(cls, manifest: dict) -> "SampleCheck":
        tok = manifest["tokenizer"]
        return cls(np.dtype(manifest["dtype"]), (len(manifest["views"]), int(tok["tokens_per_view"])),
                   int(tok["vocab_size"]), len(manifest.get("classes") or []))

    def check_class(self, cls: int, where: str) -> None:
        ok = 0 <= cls < self.num_classes if self.num_classes else cls >= -1
        if not ok:
            valid = f"0..{self.num_classes - 1}" if self.num_classes else "-1 (unlabelled) or more"
            raise UserError(f"{where}: class {cls} is outside the manifest's classes ({valid}); the shard is damaged; {_REENCODE}")

    def check_tokens(self, tokens: np.ndarray, where: str) -> None:
        if tokens.size:
            self.check_max(int(tokens.max()), where)

    def check_max(self, largest: int, where: str) -> None:
        if largest >= self.vocab_size:
            raise UserError(
                f"{where}: token {largest} is outside the vocabulary of {self.vocab_size}; "
                f"the shard is damaged or was made by another tokenizer; {_REENCODE}"
            )


def _dist_group_size() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_verifier() -> bool:
    """Rank 0 verifies shards (every process when there is no process group)."""
    return _dist_group_size()[0] == 0


def _share_verdict(verdict: str | None) -> None:
    """Rank 0's verdict on the shards (None: sound; else its one-line refusal) on every rank, raised
    everywhere when it is a refusal, so no rank is left waiting at a collective."""
    rank, world = _dist_group_size()
    if world > 1:
        import torch.distributed as dist

        box = [verdict]
        dist.broadcast_object_list(box, src=0)
        verdict = box[0]
    if verdict:
        raise UserError(verdict)


def _note_missing_checksums(root: Path, manifest: dict) -> None:
    if any(not s.get("sha256") for s in manifest["shards"]) and int(os.environ.get("RANK", "0")) == 0:
        sys.stderr.write(
            f"note: {root / MANIFEST} has no shard checksums (written by an older vqtok); the shards are checked "
            "for token and class ranges only\n"
        )


def _scan_tar(path: Path, expect: SampleCheck | None = None, sha256: str | None = None) -> tuple[list[int], list[int], list[int]]:
    """(tokens.npy data offsets, their sizes, classes) of one shard, in file order, after verifying it.

    Parses the 512-byte tar headers directly from a memory map (much faster than `tarfile`, which
    matters at ImageNet scale: 2.6M members), handling ustar prefixes, PAX and GNU long names. The same
    pass checks the shard's sha256 (when given) and each sample against `expect`.
    """
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                check_shard_checksum(path, sha256, hashlib.sha256(b"").hexdigest())
                return [], [], []
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                if sha256 is not None:
                    check_shard_checksum(path, sha256, hashlib.sha256(mm).hexdigest())
                return _scan_members(mm, size, path, expect)
    except OSError as exc:
        raise UserError(f"token shard {path} cannot be read ({exc.strerror or exc}); {_REENCODE}") from None


class _NpyChecker:
    """Checks a sample's tokens.npy bytes in place: the header (parsed once per distinct header) and the
    token range, without copying the data."""

    def __init__(self, expect: SampleCheck):
        self.expect = expect
        self.headers: dict[bytes, int] = {}  # header bytes -> data offset

    def __call__(self, mm, start: int, size: int, where: str) -> None:
        expect = self.expect
        head = bytes(mm[start : start + min(size, 256)])
        offset = None
        for header, off in self.headers.items():
            if head.startswith(header):
                offset = off
                break
        if offset is None:
            offset = self._parse(head, where)
        count = expect.shape[0] * expect.shape[1]
        if size - offset != count * expect.dtype.itemsize:
            raise UserError(f"{where}: tokens.npy holds {size - offset} data bytes, expected {count * expect.dtype.itemsize}; "
                            f"the shard is damaged; {_REENCODE}")
        # the max only: no view of the map may outlive this call (an open view keeps the mmap from closing)
        largest = int(np.frombuffer(mm, dtype=expect.dtype, count=count, offset=start + offset).max()) if count else 0
        expect.check_max(largest, where)

    def _parse(self, head: bytes, where: str) -> int:
        expect = self.expect
        try:
            fh = io.BytesIO(head)
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fh)
        except (ValueError, SyntaxError, EOFError, TypeError) as exc:
            raise UserError(f"{where}: tokens.npy has a corrupt header ({str(exc).splitlines()[0][:80]}); "
                            f"the shard is damaged; {_REENCODE}") from None
        if dtype != expect.dtype or tuple(shape) != expect.shape or fortran:
            raise UserError(f"{where}: tokens are {dtype}{tuple(shape)}, the manifest says {expect.dtype}{expect.shape}; "
                            f"the shard is damaged; {_REENCODE}")
        offset = fh.tell()
        self.headers[head[:offset]] = offset
        return offset


def _scan_members(mm, total: int, path: Path, expect: SampleCheck | None = None) -> tuple[list[int], list[int], list[int]]:
    offsets, sizes, classes = [], [], []
    check_npy = _NpyChecker(expect) if expect is not None else None
    pending: dict[str, dict] = {}
    pos, long_name = 0, None
    while pos + 512 <= total:
        header = mm[pos : pos + 512]
        if header[0] == 0 and header.count(0) == 512:  # end-of-archive blocks
            break
        try:
            size = _tar_number(header[124:136])
        except ValueError:
            raise UserError(f"token shard {path} has a corrupt tar header at byte {pos}; re-run `vqtok encode`") from None
        kind = header[156:157]
        start = pos + 512
        if start + size > total:
            raise UserError(f"token shard {path} is truncated at byte {pos}; re-run `vqtok encode`")
        if kind == b"x":  # PAX extended header: its `path` record names the next member
            long_name = _pax_path(mm[start : start + size]) or long_name
        elif kind == b"L":  # GNU long name
            long_name = mm[start : start + size].split(b"\0", 1)[0].decode()
        elif kind in (b"0", b"\0"):
            name = long_name or _header_name(header)
            long_name = None
            head, base = os.path.split(name)
            stem, _, ext = base.partition(".")
            key = os.path.join(head, stem)
            entry = pending.setdefault(key, {})
            if ext == "tokens.npy":
                entry["tokens"] = (start, size)
            elif ext == "cls":
                raw = bytes(mm[start : start + min(size, 32)])
                try:
                    entry["cls"] = int(raw.decode())
                except (UnicodeDecodeError, ValueError):
                    raise UserError(f"token shard {path} sample {key}: its cls {raw!r} is not an integer; "
                                    f"the shard is damaged; {_REENCODE}") from None
            if "tokens" in entry and "cls" in entry:
                del pending[key]
                if check_npy is not None:
                    where = f"token shard {path} sample {key}"
                    check_npy(mm, *entry["tokens"], where)
                    expect.check_class(entry["cls"], where)
                offsets.append(entry["tokens"][0])
                sizes.append(entry["tokens"][1])
                classes.append(entry["cls"])
        else:
            long_name = None
        pos = start + (size + 511) // 512 * 512
    if pending:
        key = next(iter(pending))
        raise UserError(f"sample {key} in {path} lacks tokens.npy or cls; the shard is damaged, so re-run `vqtok encode`")
    return offsets, sizes, classes


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # base-256 (GNU) for large values
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _header_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0].decode()
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0].decode()
        if prefix:
            name = f"{prefix}/{name}"
    return name


def _pax_path(records: bytes) -> str | None:
    """The `path` value of PAX records (`<len> key=value\\n` each)."""
    pos = 0
    while pos < len(records):
        space = records.find(b" ", pos)
        if space < 0:
            break
        length = int(records[pos:space])
        key, _, value = records[space + 1 : pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode()
        pos += length
    return None


class H5Tokens(torch.utils.data.Dataset):
    """Random access to `tokens.h5`: item i -> (tokens (views, T) ndarray, cls)."""

    def __init__(self, root: str | Path, manifest: dict):
        self.base = TokenH5Dataset(root, manifest, view="all")
        _note_missing_checksums(Path(root), manifest)
        verdict = None
        if _is_verifier():
            expect, sha256 = SampleCheck.from_manifest(manifest), manifest["shards"][0].get("sha256")
            done = ShardVerifications(root, expect.fingerprint + f" rows {int(manifest['num_samples'])}")
            if not done.is_verified(self.base.path.name, sha256):
                try:
                    verify_h5(self.base.path, expect, sha256, int(manifest["num_samples"]))
                    done.mark(self.base.path.name, sha256)
                    done.save()
                except UserError as exc:
                    verdict = str(exc)
        _share_verdict(verdict)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        tokens, cls = self.base[index]
        return tokens.numpy(), int(cls)


def verify_h5(path: Path, expect: SampleCheck, sha256: str | None, num_samples: int, block: int = 4096) -> None:
    """Check tokens.h5 once before training: its sha256, datasets, lengths, and every row's tokens and class."""
    import h5py

    check_shard_checksum(path, sha256)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"token file {path} cannot be opened (truncated or not HDF5: {str(exc).splitlines()[0][:80]}); {_REENCODE}") from None
    with f:
        for name in ("tokens", "cls", "keys"):
            if name not in f:
                raise UserError(f"token file {path} has no '{name}' dataset; {_REENCODE}")
        tokens, cls, keys = f["tokens"], f["cls"], f["keys"]
        if tokens.shape[0] != num_samples or cls.shape[0] != num_samples or keys.shape[0] != num_samples:
            raise UserError(f"token file {path} holds {tokens.shape[0]} rows, the manifest says {num_samples}; {_REENCODE}")
        if tokens.dtype != expect.dtype or tuple(tokens.shape[1:]) != expect.shape:
            raise UserError(f"token file {path}: tokens are {tokens.dtype}{tuple(tokens.shape[1:])}, "
                            f"the manifest says {expect.dtype}{expect.shape}; {_REENCODE}")
        for start in range(0, num_samples, block):
            try:
                rows, labels = tokens[start : start + block], cls[start : start + block]
            except OSError as exc:
                raise UserError(f"token file {path} rows {start}..{start + block - 1} cannot be read "
                                f"({str(exc).splitlines()[0][:80]}); {_REENCODE}") from None
            bad = np.flatnonzero(rows.reshape(len(rows), -1).max(axis=1) >= expect.vocab_size) if rows.size else []
            bad_cls = np.flatnonzero((labels < 0) | (labels >= expect.num_classes) if expect.num_classes else labels < -1)
            for found in (bad, bad_cls):
                if len(found):
                    i = int(found[0])
                    key = keys[start + i]
                    where = f"token file {path} sample {key.decode() if isinstance(key, bytes) else key} (row {start + i})"
                    expect.check_tokens(rows[i], where)
                    expect.check_class(int(labels[i]), where)


class EpochViewTokens(torch.utils.data.Dataset):
    """Keys (epoch, index) from StreamBatchSampler -> (tokens int64 (T,), class int64) with that epoch's view."""

    def __init__(self, base: TarTokens | H5Tokens, num_views: int, seed: int, view: str | int = "random"):
        self.base, self.num_views, self.seed = base, num_views, seed
        if view != "random" and not (isinstance(view, int) and 0 <= view < num_views):
            raise UserError(f"data.view must be 'random' or a view index in 0..{num_views - 1}, got {view!r}")
        self.view = view

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        tokens, cls = self.base[index]
        v = view_for(self.seed, epoch, index, self.num_views) if self.view == "random" else self.view
        return torch.from_numpy(tokens[v].astype(np.int64)), torch.tensor(cls, dtype=torch.long)


def open_ar_tokens(root: str | Path, manifest: dict) -> TarTokens | H5Tokens:
    if manifest["format"] == "h5":
        return H5Tokens(root, manifest)
    return TarTokens(root, manifest)
