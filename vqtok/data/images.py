"""Listing image datasets and decoding their files robustly.

Three input layouts are understood:

* ImageNet / torchvision ImageFolder: `DIR/<split>/<class>/**/*.JPEG` or the class folders directly.
  Class index = position in the sorted list of class folder names (n01440764 tench = 0, as ImageFolder,
  LlamaGen and RAR do); files are sorted within each class.
  Directory links are followed, except one that leads back into a directory the walk is already
  inside (a cycle); a file reached twice (a duplicate link) is listed once.
* A flat folder of images: label -1, or labels from a text file with lines `<file name> <class>`.
* webdataset image shards (`*.tar` holding `<key>.jpg|png|jpeg|webp` + `<key>.cls`): members are
  indexed once so any worker can read any sample by offset (random access, no streaming order).

Decoding always goes through PIL (which sniffs the real format from the header, so a PNG named .JPEG
decodes) followed by `.convert("RGB")` (so CMYK, grayscale and palette files become RGB). 16-bit
grayscale is scaled to 8 bits first, because PIL's own conversion clips it to white. Files that cannot
be decoded raise `ImageDecodeError` with a short reason; callers skip them and record the reason.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vqtok.errors import UserError

# The extensions torchvision's ImageFolder accepts (compared case-insensitively), plus GIF (PIL decodes
# its first frame).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# Image types that are listed too, so a file PIL cannot decode (HEIC without a plugin, SVG, camera raw)
# lands in skipped.jsonl with its reason instead of being ignored without a word.
OTHER_IMAGE_EXTENSIONS = (
    ".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".svg", ".ico", ".tga", ".psd", ".pcx", ".xcf",
    ".dng", ".cr2", ".nef", ".arw", ".raw",
)
# Image field names recognised inside webdataset image shards, in order of preference.
WDS_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")


class ImageDecodeError(Exception):
    """An input file that cannot be decoded into an image; `reason` says why in a few words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageRecord:
    """One input image. `path` is a file, or a tar shard when `offset` is set (the member's data offset)."""

    key: str
    label: int
    path: str
    offset: int = -1
    size: int = -1

    @property
    def source(self) -> str:
        return self.path if self.offset < 0 else f"{self.path}:{self.key}"


@dataclass
class ImageListing:
    records: list[ImageRecord]
    classes: list[str]
    layout: str  # "imagefolder" | "flat" | "wds"
    root: str
    extra: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """A hash of the exact ordered input list (keys, labels, sources): resume refuses a changed list."""
        h = hashlib.sha256()
        for r in self.records:
            h.update(f"{r.key}\t{r.label}\t{r.source}\n".encode())
        h.update("\n".join(self.classes).encode())
        return h.hexdigest()[:16]


def is_image_file(name: str) -> bool:
    """A file the listing takes: a decodable image type, or an image type reported as skipped when PIL cannot."""
    return name.lower().endswith(IMAGE_EXTENSIONS + OTHER_IMAGE_EXTENSIONS)


def list_images(root: str | Path, split: str | None = "train", labels_file: str | Path | None = None) -> ImageListing:
    """List the images under `root` in a fixed order (see module docstring for the layouts)."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"input path {root} does not exist")
    if root.is_file():
        if root.suffix == ".tar":
            return _list_wds([root], root)
        raise UserError(f"input {root} is a file; pass an image folder, an ImageNet directory or webdataset .tar shards")
    base = root / split if split and (root / split).is_dir() else root
    entries = sorted(os.scandir(base), key=lambda e: e.name)
    subdirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    tars = [Path(e.path) for e in entries if e.is_file() and e.name.endswith(".tar")]
    images = [e.name for e in entries if e.is_file() and is_image_file(e.name)]
    if tars and not images and not subdirs:
        return _list_wds(tars, base)
    if subdirs and not images:
        if labels_file is not None:
            raise UserError("--labels applies to a flat folder of images; class folders already give the labels")
        return _list_imagefolder(base, subdirs)
    if images:
        return _list_flat(base, images, labels_file)
    raise UserError(f"found no images under {base} (looked for class folders, image files and .tar shards)")


def _list_imagefolder(base: Path, classes: list[str]) -> ImageListing:
    paths: list[tuple[str, int]] = []
    seen: dict[str, int] = {}  # real path -> index in `paths`
    loops: list[str] = []
    for label, cls in enumerate(classes):
        for path, via_link, real in walk_image_files(base / cls, loops):
            if real not in seen:
                seen[real] = len(paths)
                paths.append((path, label, via_link))
            elif paths[seen[real]][2] and not via_link:
                # the same file reached through a link and directly: the direct path (and its class) wins
                paths[seen[real]] = (path, label, via_link)
    paths = [(p, lab) for p, lab, _ in paths]
    if not paths:
        raise UserError(f"the class folders under {base} hold no image files ({', '.join(IMAGE_EXTENSIONS)})")
    keys = make_keys([os.path.relpath(p, base) for p, _ in paths])
    records = [ImageRecord(key=k, label=lab, path=p) for k, (p, lab) in zip(keys, paths)]
    return ImageListing(records, list(classes), "imagefolder", str(base), extra={"link_loops": loops} if loops else {})


def walk_image_files(top: Path, loops: list[str] | None = None) -> list[tuple[str, bool, str]]:
    """(path, reached through a symlink, real path) of the image files under `top`, in torchvision's order.

    Like `sorted(os.walk(top, followlinks=True))` (the order torchvision's make_dataset uses, which
    existing fingerprints depend on), but a directory link that leads back into a directory the walk
    is already inside (`ln -s . loop`) is not followed: it is recorded in `loops` instead. So a link
    cycle cannot multiply the dataset; files reached twice are dropped by the caller (real paths are
    derived from the directory's, so only links cost a `realpath`).
    """
    top_real = os.path.realpath(top)
    found: list[tuple[str, str, list[tuple[str, bool]], bool]] = []
    stack = [(str(top), top_real, frozenset({top_real}), os.path.islink(top))]
    while stack:
        dirpath, real_dir, ancestors, via_link = stack.pop()
        try:
            entries = sorted(os.scandir(dirpath), key=lambda e: e.name)
        except OSError as exc:
            raise UserError(f"cannot read input folder {dirpath} ({exc.strerror or exc})") from None
        names = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError:
                is_dir = False
            if not is_dir:
                if is_image_file(entry.name):
                    names.append((entry.name, entry.is_symlink()))
                continue
            real = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real_dir, entry.name)
            if real in ancestors:
                if loops is not None:
                    loops.append(entry.path)
                continue
            stack.append((entry.path, real, ancestors | {real}, via_link or entry.is_symlink()))
        found.append((dirpath, real_dir, names, via_link))
    out = []
    for dirpath, real_dir, names, via_link in sorted(found, key=lambda t: t[0]):
        for name, is_link in names:
            path = os.path.join(dirpath, name)
            out.append((path, via_link or is_link, os.path.realpath(path) if is_link else os.path.join(real_dir, name)))
    return out


def _list_flat(base: Path, names: list[str], labels_file: str | Path | None) -> ImageListing:
    classes: list[str] = []
    labels = {n: -1 for n in names}
    if labels_file is not None:
        given = read_labels_file(labels_file)
        missing = [n for n in names if n not in given]
        if missing:
            raise UserError(f"labels file {labels_file} has no label for {missing[0]} ({len(missing)} file(s) unlabelled)")
        values = [given[n] for n in names]
        if all(re.fullmatch(r"-?\d+", v) for v in values):
            labels = {n: int(v) for n, v in zip(names, values)}
        else:  # class names: index = sorted order, as for class folders
            classes = sorted(set(values))
            index = {c: i for i, c in enumerate(classes)}
            labels = {n: index[v] for n, v in zip(names, values)}
    names = _unique_files(base, names)
    keys = make_keys(names)
    records = [ImageRecord(key=k, label=labels[n], path=str(base / n)) for k, n in zip(keys, names)]
    return ImageListing(records, classes, "flat", str(base))


def _unique_files(base: Path, names: list[str]) -> list[str]:
    """Drop names that are links to a file already listed (a file is never counted twice); the plain file wins."""
    by_real: dict[str, str] = {}
    for n in names:
        real = os.path.realpath(base / n)
        kept = by_real.get(real)
        if kept is None or (os.path.islink(base / kept) and not os.path.islink(base / n)):
            by_real[real] = n
    keep = set(by_real.values())
    return [n for n in names if n in keep]


def read_labels_file(path: str | Path) -> dict[str, str]:
    """Lines `<file name> <label>` (whitespace or comma separated); `#` starts a comment."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"labels file {path} does not exist")
    out: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [p for p in re.split(r"[,\s]+", line) if p]
        if len(parts) != 2:
            raise UserError(f"labels file {path} line {lineno} should be '<file name> <label>', got {line!r}")
        out[os.path.basename(parts[0])] = parts[1]
    return out


def _list_wds(tars: list[Path], base: Path) -> ImageListing:
    records: list[ImageRecord] = []
    for tar_path in tars:
        records.extend(_index_image_shard(tar_path))
    if not records:
        raise UserError(f"the webdataset shards under {base} hold no images ({', '.join(WDS_IMAGE_FIELDS)} fields)")
    raw_keys = [r.key for r in records]
    keys = make_keys(raw_keys) if len(set(raw_keys)) != len(raw_keys) else [sanitize_key(k) for k in raw_keys]
    records = [ImageRecord(key=k, label=r.label, path=r.path, offset=r.offset, size=r.size) for k, r in zip(keys, records)]
    labels = sorted({r.label for r in records if r.label >= 0})
    classes = [str(i) for i in range(labels[-1] + 1)] if labels else []
    return ImageListing(records, classes, "wds", str(base))


def _index_image_shard(tar_path: Path) -> list[ImageRecord]:
    """One pass over a tar's headers: image member offsets plus the `cls` of each key."""
    images: dict[str, tarfile.TarInfo] = {}
    labels: dict[str, int] = {}
    order: list[str] = []
    try:
        with tarfile.open(tar_path, "r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                if "." not in base:
                    continue
                # webdataset splits at the first dot of the basename; the directory is part of the key.
                stem, ext = base.split(".", 1)
                key = os.path.join(os.path.dirname(member.name), stem)
                ext = ext.lower()
                if ext in WDS_IMAGE_FIELDS and key not in images:
                    images[key] = member
                    order.append(key)
                elif ext in ("cls", "label", "index"):
                    data = tf.extractfile(member).read().decode().strip()
                    labels[key] = int(data) if re.fullmatch(r"-?\d+", data) else -1
    except (tarfile.TarError, OSError) as exc:
        raise UserError(f"cannot read webdataset shard {tar_path}: {exc}") from None
    return [
        ImageRecord(key=k, label=labels.get(k, -1), path=str(tar_path), offset=images[k].offset_data, size=images[k].size)
        for k in order
    ]


def sanitize_key(text: str) -> str:
    """A webdataset-safe key: no dots (webdataset splits the extension at the first dot), no separators."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text)


def make_keys(relpaths: list[str]) -> list[str]:
    """Dot-free sample keys, unique across the dataset, derived from the source paths.

    The file stem (`n01440764_10026`) is used when stems are unique, as in ImageNet; otherwise the
    relative path without extension (`cat_001`, `dog_001`). A key that still collides after sanitising
    gets a short hash of its full relative path appended.
    """
    stems = [os.path.splitext(os.path.basename(p))[0] for p in relpaths]
    base = stems if len(set(stems)) == len(stems) else [os.path.splitext(p)[0] for p in relpaths]
    keys = [sanitize_key(k) for k in base]
    if len(set(keys)) != len(keys):
        seen: dict[str, int] = {}
        for k in keys:
            seen[k] = seen.get(k, 0) + 1
        keys = [
            k if seen[k] == 1 else f"{k}_{hashlib.sha1(p.encode()).hexdigest()[:8]}" for k, p in zip(keys, relpaths)
        ]
    return keys


def read_record_bytes(record: ImageRecord) -> bytes:
    try:
        with open(record.path, "rb") as fh:
            if record.offset >= 0:
                fh.seek(record.offset)
                return fh.read(record.size)
            return fh.read()
    except OSError as exc:
        raise ImageDecodeError(f"unreadable file ({exc.strerror or exc})") from None


def decode_image(data: bytes) -> Image.Image:
    """Decode bytes into an RGB PIL image, or raise `ImageDecodeError` with the reason."""
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning, "truncated" EXIF warnings
            img = Image.open(io.BytesIO(data))
            img.load()  # force the full decode: a truncated file fails here, not later in a worker
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image too large ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"truncated or corrupt image data ({_short(exc)})") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale: PIL's convert("RGB") clips values above 255 (a white image), so scale instead.
        arr = np.asarray(img).astype(np.float64)
        scale = 257.0 if img.mode != "I" or arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        img = Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_record(record: ImageRecord) -> Image.Image:
    try:
        return decode_image(read_record_bytes(record))
    except ImageDecodeError as exc:
        ext = os.path.splitext(record.path if record.offset < 0 else "")[1].lower()
        if ext in OTHER_IMAGE_EXTENSIONS and exc.reason.startswith("not an image"):
            raise ImageDecodeError(f"unsupported image type {ext} (PIL cannot decode it; convert it to PNG or JPEG)") from None
        raise


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]
