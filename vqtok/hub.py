"""The Hugging Face Hub as a weights source: `hf://OWNER/REPO[@REVISION]/PATH` -> a local path.

Every option that takes weights or a checkpoint (`vqtok convert FILE`, `--init`, `--tokenizer`,
`--ckpt`) accepts such a URL; `vqtok.weights.local_source` turns it into a file (or folder) in the
Hub's own cache through `huggingface_hub`, so a file downloaded once is not downloaded again and
everything the Hub client honours applies unchanged: the cache location (`HF_HOME`, `HF_HUB_CACHE`,
or `cache_dir` here), offline mode (`HF_HUB_OFFLINE=1`: the cache only, never the network), the
token of `hf auth login` / `HF_TOKEN` for private or gated repositories, and `HF_ENDPOINT`.

URL forms:

    hf://OWNER/REPO/FILE                  the file at the default branch (main)
    hf://OWNER/REPO@REVISION/FILE         at a branch, tag or commit (`%2F` for a `/` in it: refs%2Fpr%2F1)
    hf://OWNER/REPO/SUB/DIR/FILE          FILE may sit in subfolders
    hf://OWNER/REPO/FOLDER                a vqtok checkpoint folder in the repository (its checkpoint files)
    hf://datasets/OWNER/REPO/FILE         a dataset repository (spaces/ likewise)

A `pathlib.Path` collapses the `//`, so `hf:/OWNER/REPO/FILE` (what a Path-typed option hands over) is
read the same way. Every fault is one line naming the repository and file and what to do: a malformed
URL, a repository, revision or file that does not exist, a gated repository, no network, and, in
offline mode, a file the cache does not hold.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from vqtok.errors import UserError

SCHEME = "hf://"
_REPO_TYPES = {"datasets": "dataset", "spaces": "space"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # the Hub's rule for owner and repository names
_SHAPE = "expected hf://OWNER/REPO/FILE or hf://OWNER/REPO@REVISION/FILE"
# what a vqtok checkpoint directory holds (vqtok/weights.py): all a folder URL ever fetches
CHECKPOINT_FILES = ("model.safetensors", "config.yaml", "tokenizer.json", "generator.json")


def is_hub_url(source: str | os.PathLike | None) -> bool:
    """True for `hf://...` (and the `hf:/...` a Path makes of it)."""
    if source is None:
        return False
    return str(source).startswith("hf:/")


@dataclass(frozen=True)
class HubRef:
    repo_id: str  # OWNER/REPO
    filename: str  # path inside the repository ("" for the whole repository)
    revision: str | None = None  # None: the default branch
    repo_type: str = "model"

    @property
    def url(self) -> str:
        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        at = f"@{self.revision.replace('/', '%2F')}" if self.revision else ""
        tail = f"/{self.filename}" if self.filename else ""
        return f"{SCHEME}{prefix}{self.repo_id}{at}{tail}"

    @property
    def where(self) -> str:
        """'file F of repo O/R (revision V)' for messages."""
        rev = f" at revision {self.revision}" if self.revision else ""
        kind = "" if self.repo_type == "model" else f"{self.repo_type} "
        what = f"{self.filename} of " if self.filename else ""
        return f"{what}{kind}repository {self.repo_id}{rev}"


def parse_hub_url(source: str | os.PathLike) -> HubRef:
    """Split an `hf://` URL; a malformed one is a one-line UserError saying what is wrong."""
    text = str(source)
    if text.startswith(SCHEME):
        rest = text[len(SCHEME):]
    elif text.startswith("hf:/"):
        rest = text[len("hf:/"):]
    else:
        raise UserError(f"{text} is not a Hugging Face Hub URL ({_SHAPE})")
    if "\\" in rest or "?" in rest or "#" in rest:
        raise UserError(f"malformed Hub URL {text}: it may not hold '\\', '?' or '#' ({_SHAPE})")
    parts = rest.split("/")
    repo_type = "model"
    if parts and parts[0] in _REPO_TYPES:
        repo_type = _REPO_TYPES[parts.pop(0)]
    while parts and parts[-1] == "":  # a trailing slash names the same folder
        parts.pop()
    if len(parts) < 2:
        raise UserError(f"malformed Hub URL {text}: it names no OWNER/REPO ({_SHAPE})")
    owner, repo = parts[0], parts[1]
    revision = None
    if "@" in repo:
        repo, _, revision = repo.partition("@")
        revision = unquote(revision)
        if not revision:
            raise UserError(f"malformed Hub URL {text}: nothing follows '@' (give a branch, tag or commit) ({_SHAPE})")
    for label, name in (("owner", owner), ("repository", repo)):
        if not name:
            raise UserError(f"malformed Hub URL {text}: the {label} name is empty ({_SHAPE})")
        if not _NAME.match(name) or ".." in name or len(name) > 96:
            raise UserError(f"malformed Hub URL {text}: {name!r} is not a valid {label} name "
                            "(letters, digits, '-', '_' and '.', at most 96 characters)")
    inner = parts[2:]
    if any(p in ("", ".", "..") for p in inner):
        raise UserError(f"malformed Hub URL {text}: the path inside the repository has an empty, '.' or '..' part")
    return HubRef(f"{owner}/{repo}", "/".join(inner), revision, repo_type)


def _offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The cache the Hub client uses: `cache_dir`, else HF_HUB_CACHE, else HF_HOME/hub, else its default."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HF_HUB_CACHE"])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _errors():
    """The Hub client's exception classes (in `huggingface_hub.errors`, formerly `huggingface_hub.utils`)."""
    try:
        from huggingface_hub import errors as mod
    except ImportError:  # pragma: no cover - older releases
        from huggingface_hub import utils as mod
    return mod


def _download_hint(ref: HubRef) -> str:
    kind = "" if ref.repo_type == "model" else f" --repo-type {ref.repo_type}"
    rev = f" --revision {ref.revision}" if ref.revision else ""
    target = f" {ref.filename}" if ref.filename else ""
    return f"`hf download {ref.repo_id}{target}{kind}{rev}`"


def resolve_hub_path(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                     offline: bool | None = None) -> Path:
    """The local path of `source` (an hf:// URL) in the Hub cache, downloading it first unless offline.

    A file is fetched with `hf_hub_download`; a path that is a folder in the repository holding a vqtok
    checkpoint directory (or a repository that is one) with `snapshot_download`, limited to the
    checkpoint's files.
    """
    ref = parse_hub_url(source)
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise UserError(f"{ref.url} needs the huggingface_hub package: pip install huggingface_hub") from None
    offline = _offline() if offline is None else offline
    cache = _cache_dir(cache_dir)
    try:
        if ref.filename:
            try:
                return Path(_hf_file(ref, cache, offline))
            except _errors().EntryNotFoundError as missing:
                # not a file: maybe a folder. After a failed connection only the cache is looked at again.
                cache_only = offline or isinstance(missing, _errors().LocalEntryNotFoundError)
                folder = _hf_folder(ref, cache, cache_only)
                if folder is not None:
                    return folder
                raise missing
        folder = _hf_folder(ref, cache, offline)
        if folder is None:
            raise _errors().LocalEntryNotFoundError("the repository is not in the cache")
        return folder
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - every Hub client fault becomes one line below
        raise _hub_error(exc, ref, cache, offline) from None


def _hf_file(ref: HubRef, cache: Path, offline: bool) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(ref.repo_id, ref.filename, revision=ref.revision, repo_type=ref.repo_type,
                           cache_dir=str(cache), local_files_only=offline)


def _hf_folder(ref: HubRef, cache: Path, offline: bool) -> Path | None:
    """The snapshot folder holding the vqtok checkpoint at `ref.filename/` (or at the repository's root),
    or None when there is none. Only the checkpoint's own files are fetched, never the rest of the folder
    (a mistyped path must not download a whole repository of checkpoints)."""
    from huggingface_hub import snapshot_download

    prefix = f"{ref.filename}/" if ref.filename else ""
    patterns = [prefix + name for name in CHECKPOINT_FILES]
    try:
        root = Path(snapshot_download(ref.repo_id, revision=ref.revision, repo_type=ref.repo_type,
                                      cache_dir=str(cache), local_files_only=offline, allow_patterns=patterns))
    except _errors().EntryNotFoundError:
        return None
    folder = root / ref.filename if ref.filename else root
    return folder if (folder / CHECKPOINT_FILES[0]).is_file() else None


def _hub_error(exc: Exception, ref: HubRef, cache: Path, offline: bool) -> UserError:
    errors = _errors()
    gated = getattr(errors, "GatedRepoError", ())
    revision_missing = getattr(errors, "RevisionNotFoundError", ())
    repo_missing = getattr(errors, "RepositoryNotFoundError", ())
    local_missing = getattr(errors, "LocalEntryNotFoundError", ())
    entry_missing = getattr(errors, "EntryNotFoundError", ())
    http = getattr(errors, "HfHubHTTPError", ())
    name = ref.url
    if isinstance(exc, local_missing):
        if offline:
            return UserError(
                f"{name}: {ref.where} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE=1 forbids "
                f"downloading it; fetch it once with network access ({_download_hint(ref)}, or rerun without "
                "HF_HUB_OFFLINE), or point HF_HUB_CACHE / HF_HOME at a cache that holds it"
            )
        return UserError(
            f"{name}: cannot reach the Hugging Face Hub and {ref.where} is not in the cache {cache}; check the "
            f"network (or HF_ENDPOINT), or copy a cache that holds it there ({_download_hint(ref)} on a machine online)"
        )
    if isinstance(exc, gated):
        return UserError(f"{name}: repository {ref.repo_id} is gated; accept its terms on huggingface.co and log in "
                         "(`hf auth login` or HF_TOKEN)")
    if isinstance(exc, revision_missing):
        return UserError(f"{name}: repository {ref.repo_id} has no revision {ref.revision!r} (a branch, tag or commit)")
    if isinstance(exc, repo_missing):
        return UserError(f"{name}: repository {ref.repo_id} does not exist on the Hub or is private "
                         "(log in with `hf auth login` or set HF_TOKEN for a private one)")
    if isinstance(exc, entry_missing):
        return UserError(f"{name}: {ref.where} does not exist (no such file, nor a folder holding a vqtok checkpoint)")
    if isinstance(exc, OSError) and exc.errno is not None:
        from vqtok.fs_errors import filesystem_error

        err = filesystem_error(exc, cache, "download into the Hugging Face cache")
        if err is not None:
            return err
    if isinstance(exc, http):
        return UserError(f"{name}: the Hub refused the download ({_first_line(exc)})")
    return UserError(f"{name}: cannot fetch {ref.where} from the Hugging Face Hub ({type(exc).__name__}: {_first_line(exc)})")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
