"""hf://OWNER/REPO[@REVISION]/FILE as a weights source, offline: the tests lay out a Hugging Face cache the
way `huggingface_hub` does (models--OWNER--REPO/{blobs,snapshots/<commit>,refs/<branch>}) and read it with
HF_HUB_OFFLINE=1, through `vqtok convert`, `train-tokenizer --init` and the checkpoint options."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqtok.errors import UserError
from vqtok.hub import HubRef, parse_hub_url, resolve_hub_path
from vqtok.run_dirs import resolve_checkpoint
from vqtok.tokenizer.tokenizer import Tokenizer, load_tokenizer
from vqtok.weights import load_state_dict_file, local_source

from test_tokenizer import _images, _randomize, _small

COMMIT = "3f2c1e0d9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e"
OTHER_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT,
                      refs: tuple[str, ...] = ("main",), repo_type: str = "model") -> Path:
    """A Hub cache entry as `huggingface_hub` writes it: content-addressed blobs, a snapshot folder per
    commit of relative symlinks into blobs/, and refs/<branch> holding the commit. Returns the snapshot."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def _official_llamagen(tmp_path: Path) -> tuple[Tokenizer, bytes]:
    src = _randomize(Tokenizer(_small("llamagen")))
    path = tmp_path / "official-src.pth"
    torch.save(src.state_dict(), path)  # an official file is a plain state dict under these names
    return src, path.read_bytes()


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def _cli_env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1", **extra}


def _vqtok(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vqtok", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("url, ref", [
    ("hf://acme/vq/model.pth", HubRef("acme/vq", "model.pth")),
    ("hf://acme/vq@v1.0/weights/ema/model.safetensors", HubRef("acme/vq", "weights/ema/model.safetensors", "v1.0")),
    (f"hf://acme/vq@{COMMIT}/a.bin", HubRef("acme/vq", "a.bin", COMMIT)),
    ("hf://acme/vq@refs%2Fpr%2F3/a.bin", HubRef("acme/vq", "a.bin", "refs/pr/3")),
    ("hf://acme/vq/final/", HubRef("acme/vq", "final")),
    ("hf://acme/vq", HubRef("acme/vq", "")),
    ("hf://datasets/acme/toks/x.h5", HubRef("acme/toks", "x.h5", None, "dataset")),
    ("hf:/acme/vq/model.pth", HubRef("acme/vq", "model.pth")),  # what a pathlib.Path makes of hf://
])
def test_hub_urls_parse(url, ref):
    assert parse_hub_url(url) == ref
    assert parse_hub_url(Path(url)) == ref
    assert parse_hub_url(ref.url) == ref


@pytest.mark.parametrize("url, needle", [
    ("hf://", "names no OWNER/REPO"),
    ("hf://acme", "names no OWNER/REPO"),
    ("hf:///vq/model.pth", "owner name is empty"),
    ("hf://acme/vq@/model.pth", "nothing follows '@'"),
    ("hf://acme/v q/model.pth", "not a valid repository name"),
    ("hf://-acme/vq/model.pth", "not a valid owner name"),
    ("hf://acme/vq/../../etc/passwd", "'..'"),
    ("hf://acme/vq//model.pth", "empty"),
    ("hf://acme/vq/model.pth?download=1", "may not hold"),
])
def test_malformed_hub_urls_are_one_line(url, needle):
    with pytest.raises(UserError, match=None) as info:
        parse_hub_url(url)
    message = str(info.value)
    assert needle in message and "\n" not in message, message
    assert url.rstrip("/") in message or "hf://" in message


# ------------------------------------------------------------------------------------------ offline cache


def test_a_cached_file_resolves_offline_at_the_default_branch_a_tag_and_a_commit(tmp_path, offline_cache):
    data = b"weights v2"
    snapshot = lay_out_hub_cache(offline_cache, "acme/vq", {"sub/dir/w.bin": data}, refs=("main", "v2"))
    lay_out_hub_cache(offline_cache, "acme/vq", {"sub/dir/w.bin": b"weights v1"}, commit=OTHER_COMMIT, refs=("v1",))
    for url in ("hf://acme/vq/sub/dir/w.bin", "hf://acme/vq@v2/sub/dir/w.bin", f"hf://acme/vq@{COMMIT}/sub/dir/w.bin"):
        path = resolve_hub_path(url)
        assert path == snapshot / "sub/dir/w.bin" and path.read_bytes() == data, url
    assert resolve_hub_path("hf://acme/vq@v1/sub/dir/w.bin").read_bytes() == b"weights v1"
    # an explicit cache_dir wins over HF_HUB_CACHE; HF_HOME/hub is the cache when HF_HUB_CACHE is unset
    elsewhere = tmp_path / "home"
    lay_out_hub_cache(elsewhere / "hub", "acme/vq", {"sub/dir/w.bin": b"from HF_HOME"})
    assert resolve_hub_path("hf://acme/vq/sub/dir/w.bin", cache_dir=elsewhere / "hub").read_bytes() == b"from HF_HOME"
    os.environ.pop("HF_HUB_CACHE")
    os.environ["HF_HOME"] = str(elsewhere)
    try:
        assert local_source("hf://acme/vq/sub/dir/w.bin").read_bytes() == b"from HF_HOME"
    finally:
        os.environ.pop("HF_HOME")
    assert local_source(tmp_path / "plain.bin") == tmp_path / "plain.bin"  # local paths pass through


def test_offline_and_not_cached_names_the_repo_file_and_how_to_get_it(offline_cache):
    lay_out_hub_cache(offline_cache, "acme/vq", {"w.bin": b"x"})
    cases = [
        ("hf://acme/missing/w.bin", ["w.bin of repository acme/missing", "hf download acme/missing w.bin"]),
        ("hf://acme/vq/other.bin", ["other.bin of repository acme/vq", "hf download acme/vq other.bin"]),
        ("hf://acme/vq@v9/w.bin", ["at revision v9", "hf download acme/vq w.bin --revision v9"]),
    ]
    for url, needles in cases:
        with pytest.raises(UserError) as info:
            resolve_hub_path(url)
        message = str(info.value)
        assert "\n" not in message and "HF_HUB_OFFLINE=1" in message and str(offline_cache) in message, message
        for needle in needles:
            assert needle in message, message


def test_a_vqtok_checkpoint_folder_on_the_hub_loads_as_a_checkpoint(tmp_path, offline_cache):
    src = _randomize(Tokenizer(_small("llamagen")))
    src.save(tmp_path / "ckpt")
    files = {f"release/tokenizer/{p.name}": p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    lay_out_hub_cache(offline_cache, "acme/vq", files)
    url = "hf://acme/vq/release/tokenizer"
    folder = resolve_checkpoint(url, "--tokenizer")
    assert folder.is_dir() and (folder / "model.safetensors").is_file()
    tok = load_tokenizer(folder)
    x = _images(size=32)
    assert torch.equal(tok.encode(x), src.encode(x))
    with pytest.raises(UserError, match="release/nothing of repository acme/vq"):
        resolve_checkpoint("hf://acme/vq/release/nothing", "--tokenizer")


def test_weights_loading_reads_hub_files(offline_cache):
    from safetensors.torch import save

    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}
    lay_out_hub_cache(offline_cache, "acme/vq", {"model.safetensors": save(state)})
    loaded = load_state_dict_file("hf://acme/vq/model.safetensors")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    # the checkpoint options (--init of train-ar, --tokenizer, --ckpt) resolve an hf:// file to the cached file
    resolved = resolve_checkpoint(Path("hf://acme/vq/model.safetensors"), "--init")
    assert resolved.is_file() and load_state_dict_file(resolved).keys() == state.keys()


# ------------------------------------------------------------------------------------------ the commands


def test_convert_reads_an_official_file_from_the_hub_cache(tmp_path):
    cache = tmp_path / "hf-cache"
    src, data = _official_llamagen(tmp_path)
    lay_out_hub_cache(cache, "acme/llamagen-vq", {"vq_ds16_c2i.pt": data}, refs=("main", "v1"))
    out = tmp_path / "ckpt"
    proc = _vqtok("convert", "hf://acme/llamagen-vq@v1/vq_ds16_c2i.pt", "--out", out, env=_cli_env(cache))
    assert proc.returncode == 0, proc.stderr
    assert "wrote tokenizer checkpoint" in proc.stdout and "llamagen_vq" in proc.stdout
    tok = load_tokenizer(out)
    x = _images(size=32)
    assert torch.equal(tok.encode(x), src.encode(x))
    # offline and absent: one line naming the repo and the file, how to get it, and nothing written
    missing = _vqtok("convert", "hf://acme/llamagen-vq/vq_ds8_c2i.pt", "--out", tmp_path / "other", env=_cli_env(cache))
    line = _one_error_line(missing)
    assert "vq_ds8_c2i.pt of repository acme/llamagen-vq" in line and "hf download acme/llamagen-vq vq_ds8_c2i.pt" in line
    assert not (tmp_path / "other").exists()
    bad = _vqtok("convert", "hf://acme", "--out", tmp_path / "other", env=_cli_env(cache))
    assert "malformed Hub URL" in _one_error_line(bad)


def test_train_tokenizer_init_reads_the_hub_cache(tmp_path, offline_cache):
    from vqtok.tokenizer.config import tokenizer_config_to_dict
    try:
        from vqtok.distributed import DistEnv
    except ImportError:  # before the process-group module moved to the base layer
        from vqtok.distributed import DistEnv
    from vqtok.train.tokenizer_task import TokenizerTrainTask, load_run_config

    from test_train_tokenizer import FAST, make_photos

    src, data = _official_llamagen(tmp_path)
    lay_out_hub_cache(offline_cache, "acme/llamagen-vq", {"ckpts/vq_ds16_c2i.pt": data})
    cfg = load_run_config("tiny-vqgan", FAST)
    cfg.model = tokenizer_config_to_dict(_small("llamagen"))
    photos = make_photos(tmp_path / "photos")
    task = TokenizerTrainTask(cfg, DistEnv(), photos, tmp_path / "run", init="hf://acme/llamagen-vq/ckpts/vq_ds16_c2i.pt")
    for k, v in src.state_dict().items():
        assert torch.equal(task.tokenizer.state_dict()[k], v), k
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1"):
        TokenizerTrainTask(cfg, DistEnv(), photos, tmp_path / "run2", init="hf://acme/llamagen-vq/ckpts/absent.pt")


def test_train_tokenizer_cli_init_from_the_hub_offline_is_one_line_when_absent(tmp_path):
    from test_train_tokenizer import make_photos

    photos = make_photos(tmp_path / "photos")
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    proc = _vqtok("train-tokenizer", photos, "--config", "tiny-vqgan", "--out", tmp_path / "run", "--device", "cpu",
                  "--init", "hf://acme/llamagen-vq/vq_ds16_c2i.pt", env=_cli_env(cache))
    line = _one_error_line(proc)
    assert "vq_ds16_c2i.pt of repository acme/llamagen-vq" in line and "HF_HUB_OFFLINE=1" in line
