"""The reliability sweep in miniature: hostile-but-realistic inputs and faults.

Each case asserts the exit code, that the message is one `error:` line (no traceback), and that nothing
written before changed. Cases: link cycles and duplicate links in the input, gif / unsupported image
types, damaged generator / training-state / token-shard files, out-of-range tokens, corrupt members and
truncated HDF5 before any weight update, full disks (a tiny RLIMIT_FSIZE), read-only and permission-denied
destinations, `--out` naming a file, concurrent runs and stale locks, out-of-range numeric options, honest
messages, leftovers of killed runs, and `--overwrite` on a directory vqtok did not make.
(A kill -9 during checkpoint writing is covered in test_train_engine.py / test_encode.py.)
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from vqtok.cli import app
from vqtok.data.images import list_images, load_record
from vqtok.errors import UserError
from vqtok.run_lock import acquire_run_lock, lock_path

runner = CliRunner()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN_AR = ["--config", "rar-tiny", "--device", "cpu", "epochs=null", "train.steps=2", "train.batch_size=4",
            "train.log_every=1", "train.ckpt_every=1000", "train.preview_every=1000", "train.num_workers=0",
            "optim.schedule.warmup=0"]


def _photo(seed: int, w: int = 72, h: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y - seed), np.sin(4 * (x + y))], -1) * 0.4 + 0.5
    return Image.fromarray((np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1) * 255).astype(np.uint8))


def _snapshot(root: Path) -> dict[str, str]:
    """Path -> sha256 of every file under root (what 'nothing previously written changed' compares)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(result, *needles: str) -> str:
    """Exit 2, exactly one `error:` line, no traceback; returns that line."""
    out = result.output if hasattr(result, "output") else (result.stdout + result.stderr)
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "vqtok", *map(str, args)]


def _limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    from vqtok.tokenizer.tokenizer import build_tokenizer

    torch.manual_seed(0)
    return build_tokenizer("tiny-vqgan").save(tmp_path_factory.mktemp("tok") / "tiny")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for c, cls in enumerate(("a", "b", "c")):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(3):
            _photo(10 * c + i).save(root / "train" / cls / f"{cls}_{i}.png")
    return root


def _encode_args(images: Path, tok_dir: Path, out: Path, *extra) -> list[str]:
    return ["encode", str(images), "--tokenizer", str(tok_dir), "--out", str(out), "--size", "64",
            "--shard-size", "4", "--workers", "0", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory, images, tok_dir) -> Path:
    out = tmp_path_factory.mktemp("tokens") / "wds"
    result = runner.invoke(app, _encode_args(images, tok_dir, out))
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def generator(tmp_path_factory, tok_dir) -> Path:
    from vqtok.ar.checkpoint import save_generator
    from vqtok.ar.rar import RAR, RARConfig
    from vqtok.tokenizer.tokenizer import load_tokenizer

    cfg = RARConfig(hidden_size=32, depth=2, num_heads=2, intermediate_size=64, vocab_size=512, seq_len=64,
                    num_classes=3, dropout=0.0, attn_dropout=0.0, class_dropout=0.0)
    torch.manual_seed(0)
    return save_generator(tmp_path_factory.mktemp("gen") / "gen", RAR(cfg), cfg, load_tokenizer(tok_dir).identity())


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _members(shard: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(shard) as tf:
        return {m.name: m for m in tf.getmembers()}


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


# ------------------------------------------------------------------------------ 15.1 input walking


def test_link_cycles_are_not_followed_and_duplicate_links_count_once(tmp_path):
    root = tmp_path / "data"
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(2):
            _photo(i).save(root / "train" / cls / f"{cls}{i}.png")
    (root / "train" / "a" / "loop").symlink_to(".")  # ln -s . DATA/train/a/loop
    (root / "train" / "a" / "up").symlink_to("..")  # a cycle through the parent
    (root / "train" / "b" / "again.png").symlink_to("b0.png")  # a duplicate link to a file
    (root / "train" / "b" / "sub").mkdir()
    (root / "train" / "b" / "sub" / "a_link").symlink_to(root / "train" / "a")  # another class's folder
    listing = list_images(root)
    sources = sorted(Path(r.path).name for r in listing.records)
    assert sources == ["a0.png", "a1.png", "b0.png", "b1.png"], sources
    by_name = {Path(r.path).name: r.label for r in listing.records}
    assert by_name["a0.png"] == 0 and by_name["b0.png"] == 1  # the direct path (and its class) wins over a link
    assert len({os.path.realpath(r.path) for r in listing.records}) == len(listing.records)
    assert any(p.endswith("loop") for p in listing.extra["link_loops"])
    flat = tmp_path / "flat"
    flat.mkdir()
    _photo(0).save(flat / "x.png")
    (flat / "y.png").symlink_to("x.png")
    assert [Path(r.path).name for r in list_images(flat).records] == ["x.png"]


def test_the_cycle_safe_walk_keeps_torchvisions_order(tmp_path):
    from vqtok.data.images import is_image_file, walk_image_files

    top = tmp_path / "cls"
    for sub in ("", "b", "a", "a/z", "a-1", "a/y/x"):
        (top / sub).mkdir(parents=True, exist_ok=True)
        for name in ("2.png", "10.jpg", "1.JPEG", "notes.txt"):
            (top / sub / name).write_bytes(b"x")
    (top / "lnk").symlink_to(top / "a" / "y")  # a link to a sibling tree (no cycle): followed, like os.walk
    expected = [os.path.join(d, f) for d, _, files in sorted(os.walk(top, followlinks=True)) for f in sorted(files)
                if is_image_file(f)]
    assert [p for p, _, _ in walk_image_files(top)] == expected


def test_gif_decodes_its_first_frame_and_unsupported_types_are_skipped_with_a_reason(tmp_path, tok_dir):
    root = tmp_path / "in"
    root.mkdir()
    frames = [Image.new("RGB", (64, 64), (200, 10, 10)), Image.new("RGB", (64, 64), (10, 10, 200))]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    _photo(1).save(root / "ok.png")
    (root / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)
    listing = list_images(root)
    records = {Path(r.path).name: r for r in listing.records}
    assert set(records) == {"anim.gif", "ok.png", "photo.heic"}
    first = np.asarray(load_record(records["anim.gif"]))
    assert first[..., 0].mean() > 150 and first[..., 2].mean() < 60  # the first (red) frame
    out = tmp_path / "out"
    result = runner.invoke(app, ["encode", str(root), "--tokenizer", str(tok_dir), "--out", str(out), "--size", "64",
                                 "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["source"].endswith("photo.heic") for s in skipped] == [True]
    assert "unsupported image type .heic" in skipped[0]["reason"]
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 2


# ------------------------------------------------------------------ 15.2 checksums and verification


def test_a_generator_with_flipped_bytes_is_refused(tmp_path, generator):
    from vqtok.ar.checkpoint import load_generator

    damaged = _copy(generator, tmp_path / "gen")
    weights = damaged / "model.safetensors"
    size = weights.stat().st_size
    _patch(weights, size - 4096, bytes(b ^ 0xFF for b in weights.read_bytes()[size - 4096:]))
    before = _snapshot(tmp_path)
    result = runner.invoke(app, ["sample", "--ckpt", str(damaged), "--out", str(tmp_path / "s"), "--tokens-only",
                                 "--num-samples", "2", "--device", "cpu"])
    _one_line_error(result, str(damaged), "does not match the hash")
    assert _snapshot(tmp_path) == before and not (tmp_path / "s").exists()
    load_generator(generator)  # the intact copy still loads


def test_a_damaged_training_state_is_refused_by_its_checksum(tmp_path):
    from vqtok.train import checkpoint as ckpt

    state = {"step": 1, "modules": {"m": torch.nn.Linear(4, 4).state_dict()}}
    path = ckpt.write_checkpoint(tmp_path, 1, state, {"step": 1}, keep_last=2)
    data = (path / "state.pt").read_bytes()
    assert json.loads((path / "meta.json").read_text())["state_sha256"] == hashlib.sha256(data).hexdigest()
    offset = data.index(b"data/0") + 200  # inside the tensor data, so torch.load alone would not notice
    _patch(path / "state.pt", offset, bytes([data[offset] ^ 0x55]))
    with pytest.raises(UserError, match="state.pt does not match the sha256"):
        ckpt.read_checkpoint(path)


def test_inspect_verifies_shard_checksums_and_quick_skips_them(tmp_path, tokens):
    result = runner.invoke(app, ["inspect", str(tokens)])
    assert result.exit_code == 0 and "checksums     OK (3 shard(s))" in result.output, result.output
    manifest = json.loads((tokens / "manifest.json").read_text())
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    damaged = _copy(tokens, tmp_path / "tokens")
    shard = damaged / "tokens-000000.tar"
    member = next(m for n, m in _members(shard).items() if n.endswith("tokens.npy"))
    value = np.frombuffer(shard.read_bytes()[member.offset_data + 128 : member.offset_data + 130], np.uint16)[0]
    _patch(shard, member.offset_data + 128, np.uint16((int(value) + 1) % 512).tobytes())  # still in range
    _one_line_error(runner.invoke(app, ["inspect", str(damaged)]), "tokens-000000.tar", "sha256")
    quick = runner.invoke(app, ["inspect", str(damaged), "--quick"])
    assert quick.exit_code == 0 and "not checked (--quick)" in quick.output


def _train_ar(tokens: Path, tok_dir: Path, out: Path, *extra):
    return runner.invoke(app, ["train-ar", str(tokens), "--tokenizer", str(tok_dir), "--out", str(out), *TRAIN_AR, *extra])


def test_train_ar_refuses_a_shard_whose_checksum_changed_before_any_step(tmp_path, tokens, tok_dir):
    damaged = _copy(tokens, tmp_path / "tokens")
    shard = damaged / "tokens-000001.tar"
    member = next(m for n, m in _members(shard).items() if n.endswith("tokens.npy"))
    _patch(shard, member.offset_data + 130, b"\x01\x00")
    result = _train_ar(damaged, tok_dir, tmp_path / "run")
    _one_line_error(result, "tokens-000001.tar", "sha256")
    assert not list((tmp_path).rglob("state.pt")) and not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("damage", ["out-of-vocabulary", "npy-header", "cls"])
def test_train_ar_names_shard_and_sample_of_a_bad_member(tmp_path, tokens, tok_dir, damage):
    damaged = _copy(tokens, tmp_path / "tokens")
    manifest = json.loads((damaged / "manifest.json").read_text())
    for s in manifest["shards"]:  # an old manifest (no checksums): the per-sample checks must catch it
        s.pop("sha256")
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    shard = damaged / "tokens-000002.tar"
    members = _members(shard)
    name = next(n for n in members if n.endswith("tokens.npy"))
    key = name.split(".")[0]
    if damage == "out-of-vocabulary":
        _patch(shard, members[name].offset_data + 128 + 6, np.uint16(60000).tobytes())
        needle = "token 60000 is outside the vocabulary of 512"
    elif damage == "npy-header":
        _patch(shard, members[name].offset_data, b"garbage!")
        needle = "corrupt header"
    else:
        _patch(shard, members[f"{key}.cls"].offset_data, b"x")
        needle = "is not an integer"
    result = _train_ar(damaged, tok_dir, tmp_path / "run")
    line = _one_line_error(result, "tokens-000002.tar", f"sample {key}", needle)
    assert "no shard checksums" in result.output  # the old manifest is said, not silently trusted
    assert line and not list(tmp_path.rglob("state.pt"))
    bad = runner.invoke(app, ["inspect", str(damaged)])
    assert bad.exit_code == 2


def test_train_ar_refuses_a_truncated_or_out_of_range_hdf5(tmp_path, images, tok_dir):
    out = tmp_path / "h5"
    assert runner.invoke(app, _encode_args(images, tok_dir, out, "--format", "h5")).exit_code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"][0]["sha256"]) == 64
    truncated = _copy(out, tmp_path / "truncated")
    data = (truncated / "tokens.h5").read_bytes()
    (truncated / "tokens.h5").write_bytes(data[: len(data) // 2])
    _one_line_error(_train_ar(truncated, tok_dir, tmp_path / "run1"), "tokens.h5")
    import h5py

    oov = _copy(out, tmp_path / "oov")
    with h5py.File(oov / "tokens.h5", "r+") as f:
        f["tokens"][3, 0, 5] = 999
        key = f["keys"][3].decode()
    m = json.loads((oov / "manifest.json").read_text())
    m["shards"][0].pop("sha256")
    (oov / "manifest.json").write_text(json.dumps(m))
    _one_line_error(_train_ar(oov, tok_dir, tmp_path / "run2"), "tokens.h5", f"sample {key}", "token 999")
    assert not list(tmp_path.rglob("state.pt"))


# ------------------------------------------------------------------------------ 15.5 filesystem faults


def test_disk_full_during_encode_is_one_line_leaves_no_temporaries_and_a_rerun_completes(tmp_path, images, tok_dir):
    out = tmp_path / "out"
    args = _encode_args(images, tok_dir, out, "--shard-size", "100")  # one shard of ~15 KB
    full = subprocess.run(_cli(*args), env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size(8 * 1024))
    _one_line_error(full, "cannot write", "file too large", "rerun")
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], list(out.rglob("*"))
    assert not (out / "manifest.json").exists() and not lock_path(out).exists()
    rerun = subprocess.run(_cli(*args), env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 9


@pytest.mark.parametrize("limit, needle", [(4 * 1024, "file too large"), (10 * 1024, "only 0.0 MB fit")])
def test_disk_full_during_an_hdf5_encode_is_one_line_not_a_crash(tmp_path, images, tok_dir, limit, needle):
    # 4 KB: a per-shard part cannot be written; 10 KB: the parts fit but the merged tokens.h5 does not
    # (the HDF5 library kills the process on a failed write, so parts go through Python file I/O and the
    # merge checks the room it needs first).
    out = tmp_path / "out"
    args = _encode_args(images, tok_dir, out, "--format", "h5")
    full = subprocess.run(_cli(*args), env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size(limit))
    _one_line_error(full, "cannot write", needle)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name] and not (out / "tokens.h5").exists()
    rerun = subprocess.run(_cli(*args), env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert ("resuming" in rerun.stdout) == (limit > 8 * 1024)
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 9


_MERGE_SCRIPT = """
import errno, os, sys
from pathlib import Path
import numpy as np
from vqtok.data import token_shards
from vqtok.data.token_shards import TokenShardWriter, merge_h5_parts
from vqtok.errors import UserError

out, mode, budget = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(0)
for k in range(6):  # six parts of 40 incompressible rows (20 KB each)
    w = TokenShardWriter(out, k, "h5", np.uint16, 2, 256)
    for i in range(40):
        w.write(f"img_{k}_{i:03d}", rng.integers(0, 1024, (2, 256), dtype=np.uint16), i % 3)
    w.close()
if mode == "build":
    merge_h5_parts(out, 6, np.dtype(np.uint16), (2, 256), 240)
    sys.exit(0)

class Failing:
    # the disk fails after `budget` bytes of the merged store: ENOSPC or EIO from a real file's write
    def __init__(self, fh, code):
        self.fh, self.code, self.written = fh, code, 0
    def write(self, data):
        self.written += memoryview(data).nbytes
        if self.written > budget:
            raise OSError(self.code, os.strerror(self.code))
        return self.fh.write(data)
    def __getattr__(self, name):
        return getattr(self.fh, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.fh.close()

if mode in ("ENOSPC", "EIO"):
    code = getattr(errno, mode)
    token_shards._open_merge_target = lambda path: Failing(open(path, "w+b"), code)
else:  # "EFBIG": the kernel's own error (RLIMIT_FSIZE), with the up-front room check out of the way
    token_shards._check_room_for = lambda path, size: None
try:
    merge_h5_parts(out, 6, np.dtype(np.uint16), (2, 256), 240)
except UserError as exc:
    print(exc)
    sys.exit(2)
"""


@pytest.mark.parametrize("mode, needle", [("ENOSPC", "no space left on device"),
                                          ("EIO", "input/output error"),
                                          ("EFBIG", "file too large")])
def test_hdf5_merge_failing_mid_write_is_one_line_and_keeps_the_previous_store(tmp_path, mode, needle):
    # a previous tokens.h5 (an earlier merge of other rows) must survive a merge that fails half-way, and the
    # HDF5 library must not crash the process (exit code 2, not a signal)
    out = tmp_path / "h5"
    old = tmp_path / "old"
    build = subprocess.run([sys.executable, "-c", _MERGE_SCRIPT, str(old), "build", "0"], env=ENV,
                           capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    out.mkdir()
    shutil.copy(old / "tokens.h5", out / "tokens.h5")
    previous = (out / "tokens.h5").read_bytes()
    limit = 60 * 1024  # room for the parts (~122 KB in all, each under the limit) but not for the whole store
    preexec = _limit_file_size(limit) if mode == "EFBIG" else None
    proc = subprocess.run([sys.executable, "-c", _MERGE_SCRIPT, str(out), mode, str(limit)], env=ENV,
                          capture_output=True, text=True, timeout=120, preexec_fn=preexec)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "HDF5-DIAG" not in proc.stderr, proc.stderr
    message = proc.stdout.strip()
    assert "\n" not in message and f"cannot write {out / 'tokens.h5'}" in message and needle in message, message
    assert (out / "tokens.h5").read_bytes() == previous
    assert not [p for p in out.rglob("*") if ".tmp" in p.name], list(out.rglob("*"))
    import h5py

    with h5py.File(out / "tokens.h5", "r") as f:  # still the complete previous store
        assert f["tokens"].shape == (240, 2, 256)


def test_disk_full_while_sampling_is_one_line_and_leaves_nothing(tmp_path, generator):
    out = tmp_path / "s"
    args = ["sample", "--ckpt", generator, "--out", out, "--tokens-only", "--num-samples", "64", "--batch-size", "64", "--device", "cpu"]
    full = subprocess.run(_cli(*args), env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size(4 * 1024))  # tokens.npy is 8 KB
    line = _one_line_error(full, "cannot write", "file-size limit")
    assert f"the samples to {out}" in line, line  # names where it was writing
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no half-written --out, work dir or lock
    rerun = subprocess.run(_cli(*args), env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert np.load(out / "tokens.npy").shape == (64, 8, 8)


def test_png_writes_are_atomic_and_a_full_disk_keeps_the_previous_png(tmp_path):
    from vqtok.atomic_files import atomic_write_png

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)  # incompressible: a ~28 KB PNG
    path = tmp_path / "previews" / "step-00000010.png"
    atomic_write_png(path, noise)
    assert np.array_equal(np.asarray(Image.open(path)), noise)
    as_tensor = torch.from_numpy(noise).permute(2, 0, 1).float() / 255
    atomic_write_png(path, as_tensor)  # (3, H, W) in [0, 1], as the preview grids are
    assert np.array_equal(np.asarray(Image.open(path)), noise)
    small = np.zeros((8, 8, 3), np.uint8)
    atomic_write_png(path, Image.fromarray(small))
    before = path.read_bytes()
    # the next preview does not fit (a real EFBIG from RLIMIT_FSIZE): one line, the old PNG intact, no temporary
    script = ("import sys, numpy as np\n"
              "from vqtok.atomic_files import atomic_write_png\n"
              "from vqtok.errors import UserError\n"
              f"noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)\n"
              "try:\n"
              f"    atomic_write_png({str(path)!r}, noise)\n"
              "except UserError as exc:\n"
              "    print(exc); sys.exit(2)\n")
    full = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120,
                          preexec_fn=_limit_file_size(16 * 1024))
    assert full.returncode == 2, full.stdout + full.stderr
    assert f"cannot write {path}: file too large" in full.stdout and "\n" not in full.stdout.strip()
    assert path.read_bytes() == before and np.array_equal(np.asarray(Image.open(path)), small)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_disk_full_at_a_checkpoint_is_one_line_and_keeps_the_run_resumable(tmp_path, tokens, tok_dir):
    run = tmp_path / "run"
    args = ["train-ar", tokens, "--tokenizer", tok_dir, "--out", run, *TRAIN_AR, "train.steps=4", "train.ckpt_every=2"]
    ok = subprocess.run(_cli(*args[:-2], "train.steps=2"), env=ENV, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    before = _snapshot(run / "checkpoints")
    # resume towards step 4 with no room for the next checkpoint
    full = subprocess.run(_cli(*args, "--resume", "auto"), env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size(32 * 1024))
    _one_line_error(full, "cannot write", "file too large")
    assert _snapshot(run / "checkpoints") == before  # the good checkpoint is untouched, no temporaries
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]
    rerun = subprocess.run(_cli(*args, "--resume", "auto"), env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert (run / "final" / "generator.json").is_file()


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_read_only_permission_denied_and_full_destinations_are_user_errors(tmp_path, tokens, tok_dir, generator, images,
                                                                          monkeypatch, code):
    # Tests run as root (permissions are not enforced) and without a read-only mount, so the kernel's
    # answer is injected where the first directory of each output is made.
    real_mkdir = os.mkdir

    def refusing_mkdir(path, *a, **kw):
        if str(path).startswith(str(tmp_path / "dest")):
            raise OSError(code, os.strerror(code), str(path))
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(os, "mkdir", refusing_mkdir)
    words = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.ENOSPC: "no space left"}[code]
    for argv in (
        ["convert", str(generator / "model.safetensors"), "--out", str(tmp_path / "dest" / "conv"), "--arch", "rar"],
        ["encode", str(tokens), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "dest" / "enc")],
        ["train-ar", str(tokens), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "dest" / "run"), *TRAIN_AR],
        ["train-tokenizer", str(images), "--config", "tiny-vqgan", "--out", str(tmp_path / "dest" / "tok"),
         "--device", "cpu"],
        ["sample", "--ckpt", str(generator), "--out", str(tmp_path / "dest" / "s"), "--tokens-only", "--num-samples", "1", "--device", "cpu"],
    ):
        _one_line_error(runner.invoke(app, argv), words)
    assert not (tmp_path / "dest").exists()


def test_out_naming_a_file_is_refused_by_every_writing_command(tmp_path, tokens, tok_dir, generator, images):
    blocker = tmp_path / "file"
    blocker.write_text("keep")
    for argv in (
        ["train-ar", str(tokens), "--tokenizer", str(tok_dir), "--out", str(blocker), *TRAIN_AR],
        ["train-tokenizer", str(images), "--config", "tiny-vqgan", "--out", str(blocker), "--device", "cpu"],
        _encode_args(images, tok_dir, blocker),
        ["sample", "--ckpt", str(generator), "--out", str(blocker), "--tokens-only", "--device", "cpu"],
        ["convert", str(generator / "model.safetensors"), "--out", str(blocker), "--arch", "rar", "--overwrite"],
    ):
        result = runner.invoke(app, argv)
        assert result.exit_code == 2, (argv, result.output, result.exception)
        _one_line_error(result, "is a file")
    assert blocker.read_text() == "keep"


def _without_dac_override():
    """preexec_fn: as root, drop CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH from the bounding set before exec, so
    the kernel enforces file permissions for the child as for any user (root's capabilities after exec come
    from the bounding set)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2
    for cap in (cap_dac_override, cap_dac_read_search):
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _permissions_enforced(tmp_path: Path):
    """The preexec_fn under which a chmod 0o555 directory refuses writes (None when not root), or skip."""
    if os.geteuid() != 0:
        return None
    probe = tmp_path / "probe"
    probe.mkdir(mode=0o555)
    probe.chmod(0o555)
    try:
        check = subprocess.run([sys.executable, "-c", f"open({str(probe / 'x')!r}, 'w')"], capture_output=True,
                               preexec_fn=_without_dac_override, timeout=60)
    except (OSError, subprocess.SubprocessError):
        check = None
    finally:
        probe.chmod(0o755)
    if check is None or check.returncode == 0:
        pytest.skip("running as root and file permissions cannot be enforced for a child process here")
    return _without_dac_override


def test_a_read_only_destination_is_one_line_and_changes_nothing(tmp_path, tokens, tok_dir, generator, images):
    # a real read-only directory (chmod 0o555), not an injected error: as root the children run without the
    # capability that ignores permissions
    preexec = _permissions_enforced(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "enc").mkdir()  # an existing, empty, read-only --out
    before = _snapshot(tmp_path)
    cases = [
        (["convert", generator / "model.safetensors", "--out", locked / "conv", "--arch", "rar"], locked),
        (_encode_args(images, tok_dir, locked / "new-enc"), locked),
        (["train-ar", tokens, "--tokenizer", tok_dir, "--out", locked / "run", *TRAIN_AR], locked),
        (["train-tokenizer", images, "--config", "tiny-vqgan", "--out", locked / "tok", "--device", "cpu",
          "train.steps=1", "train.batch_size=2", "train.num_workers=0"], locked),
        (["sample", "--ckpt", generator, "--out", locked / "s", "--tokens-only", "--num-samples", "1", "--device", "cpu"], locked),
        (_encode_args(images, tok_dir, locked / "enc"), locked / "enc"),
    ]
    try:
        for argv, read_only in cases:
            read_only.chmod(0o555)
            try:
                proc = subprocess.run(_cli(*argv), env=ENV, capture_output=True, text=True, timeout=300,
                                      preexec_fn=preexec)
            finally:
                read_only.chmod(0o755)
            line = _one_line_error(proc, "permission denied")
            assert "choose a destination you can write to" in line, line
            assert sorted(p.name for p in locked.iterdir()) == ["enc"], (argv, list(locked.iterdir()))
            assert not any((locked / "enc").iterdir())
    finally:
        locked.chmod(0o755)
        (locked / "enc").chmod(0o755)
    assert _snapshot(tmp_path) == before


# ------------------------------------------------------------------------ shard verification, once


def _counting_verification(monkeypatch) -> dict[str, int]:
    """Count the shard checksums and per-sample checks that train-ar's start-up pass performs."""
    from vqtok.train import ar_data

    calls = {"sha256": 0, "samples": 0}
    real_check, real_call = ar_data.check_shard_checksum, ar_data._NpyChecker.__call__

    def check(*a, **kw):
        calls["sha256"] += 1
        return real_check(*a, **kw)

    def sample(self, *a, **kw):
        calls["samples"] += 1
        return real_call(self, *a, **kw)

    monkeypatch.setattr(ar_data, "check_shard_checksum", check)
    monkeypatch.setattr(ar_data._NpyChecker, "__call__", sample)
    return calls


def test_shard_verification_is_remembered_and_a_changed_shard_is_verified_again(tmp_path, tokens, monkeypatch):
    from vqtok.data.token_shards import VERIFIED, iter_samples, read_manifest
    from vqtok.train.ar_data import open_ar_tokens

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    toks = _copy(tokens, tmp_path / "toks")
    (toks / VERIFIED).unlink(missing_ok=True)  # left by the runs on the shared fixture
    manifest = read_manifest(toks)
    names = [s["name"] for s in manifest["shards"]]
    assert len(names) == 3
    calls = _counting_verification(monkeypatch)
    first = open_ar_tokens(toks, manifest)
    assert calls == {"sha256": 3, "samples": 9}
    record = json.loads((toks / VERIFIED).read_text())
    assert sorted(record["shards"]) == names and record["shards"][names[0]]["sha256"] == manifest["shards"][0]["sha256"]
    # a restart (or resume) hashes and range-checks nothing that did not change, and indexes the same samples
    calls.update(sha256=0, samples=0)
    again = open_ar_tokens(toks, manifest)
    assert calls == {"sha256": 0, "samples": 0}
    assert np.array_equal(again.offsets, first.offsets) and np.array_equal(again.classes, first.classes)
    # one shard rewritten in place with in-range tokens and its mtime put back: the ctime still changed, so it
    # alone is verified again, and refused
    shard = toks / names[1]
    stat = shard.stat()
    member = next(m for m in _members(shard).values() if m.name.endswith(".tokens.npy"))
    _patch(shard, member.offset_data + member.size - 2, b"\x01\x00")
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    calls.update(sha256=0, samples=0)
    with pytest.raises(UserError, match=f"token shard {shard} does not match the sha256"):
        open_ar_tokens(toks, manifest)
    assert calls["sha256"] == 1
    # a shard that is only touched is verified again and passes; the others are still not re-read
    _copy(tokens, tmp_path / "fresh")
    shutil.copy(tmp_path / "fresh" / names[1], shard)
    calls.update(sha256=0, samples=0)
    open_ar_tokens(toks, manifest)
    assert calls == {"sha256": 1, "samples": manifest["shards"][1]["count"]}
    # another expectation (here a smaller vocabulary) is a different check: everything is verified again
    narrower = json.loads(json.dumps(manifest))
    narrower["tokenizer"]["vocab_size"] = 1 + max(int(t.max()) for _, t, _ in iter_samples(toks, manifest))
    calls.update(sha256=0, samples=0)
    open_ar_tokens(toks, narrower)
    assert calls["sha256"] == 3


def test_an_hdf5_store_is_verified_once_until_it_changes(tmp_path, images, tok_dir, monkeypatch):
    from vqtok.data.token_shards import read_manifest
    from vqtok.train import ar_data

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = tmp_path / "h5"
    assert runner.invoke(app, _encode_args(images, tok_dir, out, "--format", "h5")).exit_code == 0
    manifest = read_manifest(out)
    verified = []
    real = ar_data.verify_h5
    monkeypatch.setattr(ar_data, "verify_h5", lambda *a, **kw: (verified.append(a[0]), real(*a, **kw))[1])
    ar_data.open_ar_tokens(out, manifest)
    ar_data.open_ar_tokens(out, manifest)
    assert verified == [out / "tokens.h5"]
    import h5py

    with h5py.File(out / "tokens.h5", "r+") as f:  # an in-range change: the sha256 no longer matches
        f["cls"][0] = (int(f["cls"][0]) + 1) % 3
    with pytest.raises(UserError, match="does not match the sha256"):
        ar_data.open_ar_tokens(out, manifest)
    assert len(verified) == 2


def test_a_read_only_token_folder_keeps_its_verification_record_in_the_user_cache(tmp_path, tokens, monkeypatch):
    from vqtok.data.token_shards import VERIFIED, ShardVerifications, read_manifest
    from vqtok.train.ar_data import open_ar_tokens

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    toks = _copy(tokens, tmp_path / "toks")
    (toks / VERIFIED).unlink(missing_ok=True)  # left by the runs on the shared fixture
    (toks / VERIFIED).mkdir()  # the record cannot be written in the token folder
    manifest = read_manifest(toks)
    calls = _counting_verification(monkeypatch)
    open_ar_tokens(toks, manifest)
    assert calls["sha256"] == 3
    stored = list((tmp_path / "xdg" / "vqtok" / "verified").iterdir())
    assert len(stored) == 1 and stored[0] == ShardVerifications(toks, "").locations()[1]
    calls.update(sha256=0, samples=0)
    open_ar_tokens(toks, manifest)
    assert calls == {"sha256": 0, "samples": 0}


_RANKS_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from vqtok.data.token_shards import read_manifest
from vqtok.errors import UserError
from vqtok.train import ar_data

calls = [0]
real = ar_data.check_shard_checksum
def counting(*a, **kw):
    calls[0] += 1
    return real(*a, **kw)
ar_data.check_shard_checksum = counting
dist.init_process_group("gloo")
root = sys.argv[1]
try:
    data = ar_data.open_ar_tokens(root, read_manifest(root))
    result = {"rank": dist.get_rank(), "checksums": calls[0], "samples": len(data)}
except UserError as exc:
    result = {"rank": dist.get_rank(), "checksums": calls[0], "error": str(exc)}
with open(os.path.join(sys.argv[2], f"rank-{dist.get_rank()}.json"), "w") as fh:
    json.dump(result, fh)
dist.destroy_process_group()
"""


def test_under_torchrun_only_rank_zero_verifies_and_a_refusal_reaches_every_rank(tmp_path, tokens):
    toks = _copy(tokens, tmp_path / "toks")
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS_SCRIPT)
    env = {**ENV, "XDG_CACHE_HOME": str(tmp_path / "xdg")}

    def run() -> dict[int, dict]:
        results = tmp_path / "results"
        shutil.rmtree(results, ignore_errors=True)
        results.mkdir()
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(script), str(toks), str(results)], env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return {rank: json.loads((results / f"rank-{rank}.json").read_text()) for rank in (0, 1)}

    results = run()
    assert results[0]["checksums"] == 3 and results[1]["checksums"] == 0
    assert results[0]["samples"] == results[1]["samples"] == 9
    shard = toks / "tokens-000002.tar"
    member = next(m for m in _members(shard).values() if m.name.endswith(".tokens.npy"))
    _patch(shard, member.offset_data + member.size - 2, b"\x01\x00")  # in range: only the sha256 sees it
    results = run()
    assert results[0]["checksums"] == 1 and results[1]["checksums"] == 0  # only the changed shard, on rank 0
    for rank in (0, 1):
        assert f"token shard {shard} does not match the sha256" in results[rank]["error"]


# ----------------------------------------------------------------------------------------- run locks


def test_a_second_run_on_the_same_out_is_refused_and_a_stale_lock_is_taken_over(tmp_path, images, tok_dir):
    out = tmp_path / "out"
    lock = acquire_run_lock(out, "encode")  # a live run (this process) holds --out
    try:
        result = runner.invoke(app, _encode_args(images, tok_dir, out))
        _one_line_error(result, "in use by a `vqtok encode` run", f"pid {os.getpid()}")
        assert not out.exists() or not any(out.iterdir())
    finally:
        lock.release()
    assert not lock_path(out).exists()
    # a run killed with SIGKILL leaves its lock file; the next run takes it over with a message
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from vqtok.run_lock import acquire_run_lock; "
                               f"held = acquire_run_lock({str(out)!r}, 'encode'); print('locked', flush=True); time.sleep(60)"],
                              env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    busy = runner.invoke(app, _encode_args(images, tok_dir, out))
    _one_line_error(busy, "in use by", f"pid {holder.pid}")
    holder.kill()
    holder.wait()
    assert lock_path(out).exists()
    result = runner.invoke(app, _encode_args(images, tok_dir, out))
    assert result.exit_code == 0, result.output
    assert f"took over the stale lock on {out} left by a `vqtok encode` run (pid {holder.pid}" in result.output
    assert not lock_path(out).exists()


def test_training_and_sampling_refuse_an_out_that_another_run_holds(tmp_path, tokens, tok_dir, generator):
    for argv in (
        ["train-ar", str(tokens), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "run"), *TRAIN_AR],
        ["sample", "--ckpt", str(generator), "--out", str(tmp_path / "run"), "--tokens-only", "--num-samples", "1", "--device", "cpu"],
    ):
        lock = acquire_run_lock(tmp_path / "run", "train")  # a library caller names its own command
        try:
            _one_line_error(runner.invoke(app, argv), "in use by a `vqtok train` run")
        finally:
            lock.release()
        assert not (tmp_path / "run").exists()


def test_the_lock_message_names_the_command_the_user_ran_and_its_run_dir(tmp_path, tokens, tok_dir, generator, monkeypatch):
    # a real `train-ar` holds its --out (the engine asks for a lock on behalf of "train"); a second command on
    # that directory is told which command holds it, its pid and the run directory it writes
    run = tmp_path / "run"
    argv = ["train-ar", str(tokens), "--tokenizer", str(tok_dir), "--out", str(run), *TRAIN_AR, "train.steps=100000"]
    holder = subprocess.Popen(_cli(*argv), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path)
    try:
        deadline = time.time() + 240
        while not lock_path(run).exists() or not lock_path(run).read_text().strip():
            assert holder.poll() is None and time.time() < deadline, holder.stderr.read() if holder.poll() is not None else "no lock"
            time.sleep(0.2)
        owner = json.loads(lock_path(run).read_text())
        assert owner["command"] == "train-ar" and owner["pid"] == holder.pid
        assert owner["run_dir"] == os.path.realpath(run)
        monkeypatch.chdir(tmp_path)  # the second run names --out relatively: the message adds the real path
        sample = ["sample", "--ckpt", str(generator), "--out", "run", "--tokens-only", "--num-samples", "1", "--device", "cpu"]
        line = _one_line_error(runner.invoke(app, sample), "run is in use by a `vqtok train-ar` run", f"pid {holder.pid}")
        assert f"writing {os.path.realpath(run)}" in line
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------ 15.6 numeric options


@pytest.mark.parametrize("override, needle", [
    ("train.batch_size=0", "train.batch_size must be at least 1, got 0"),
    ("train.grad_accum=0", "train.grad_accum must be at least 1, got 0"),
    ("train.ema_decay=1.5", "train.ema_decay must be in [0.0, 1.0), got 1.5"),
    ("optim.lr=-1", "optim.lr must be greater than 0.0, got -1"),
    ("optim.betas=[0.9,1.2]", "optim.betas[1] must be in [0.0, 1.0), got 1.2"),
    ("train.num_workers=-1", "train.num_workers must be at least 0, got -1"),
])
def test_out_of_range_training_options_name_the_valid_range(tmp_path, tokens, tok_dir, override, needle):
    _one_line_error(_train_ar(tokens, tok_dir, tmp_path / "run", override), needle)
    assert not (tmp_path / "run").exists()


def test_out_of_range_tokenizer_optimizer_options_name_the_key_path(tmp_path, images):
    for override, needle in (("optim.generator.lr=-1", "optim.generator.lr must be greater than 0.0, got -1"),
                             ("optim.discriminator.eps=0", "optim.discriminator.eps must be greater than 0.0"),
                             ("data.resolution=0", "data.resolution must be at least 8, got 0"),
                             ("loss.lecam_decay=1", "loss.lecam_decay must be in [0.0, 1.0), got 1")):
        result = runner.invoke(app, ["train-tokenizer", str(images), "--config", "tiny-vqgan", "--out",
                                     str(tmp_path / "run"), "--device", "cpu", override])
        _one_line_error(result, needle)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--top-p", "0"], "--top-p must be in (0.0, 1.0], got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0.0, 1.0], got 1.5"),
    (["--temperature", "-1"], "--temperature must be at least 0.0, got -1.0"),
    (["--cfg", "-2"], "--cfg must be at least 0.0, got -2.0"),
    (["--cfg-power", "-1"], "--cfg-power must be at least 0.0"),
])
def test_out_of_range_sampling_options_name_the_valid_range(tmp_path, generator, flags, needle):
    result = runner.invoke(app, ["sample", "--ckpt", str(generator), "--out", str(tmp_path / "s"), "--tokens-only",
                                 "--device", "cpu", *flags])
    _one_line_error(result, needle)
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------ 15.7 messages


def test_random_bytes_are_not_a_weight_file_and_no_absent_flag_is_suggested(tmp_path):
    from vqtok.weights import load_state_dict_file

    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    line = _one_line_error(runner.invoke(app, ["convert", str(noise), "--out", str(tmp_path / "c")]),
                           "not a weight file (unrecognised content")
    assert "pickle" not in line
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "hub.bin")  # safetensors content under a .bin name loads
    assert torch.equal(load_state_dict_file(tmp_path / "hub.bin")["w"], torch.ones(2))
    import argparse

    pickled = tmp_path / "pickled.pth"
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(a=1)}, pickled)
    with pytest.raises(UserError) as exc:  # eval-fid / LPIPS load without a --trust-pickle flag
        load_state_dict_file(pickled)
    assert "pickled Python objects" in str(exc.value) and "--trust-pickle" not in str(exc.value)
    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(2):
        _photo(i).save(samples / f"{i}.png")
    result = runner.invoke(app, ["eval-fid", str(samples), "--ref", str(samples), "--inception-weights", str(pickled),
                                 "--device", "cpu"])
    line = _one_line_error(result, "pickled")
    assert "--trust-pickle" not in line


def test_a_worker_side_data_error_is_one_line_without_the_worker_traceback(tmp_path):
    root = tmp_path / "broken"
    (root / "c").mkdir(parents=True)
    for i in range(2):
        (root / "c" / f"{i}.png").write_bytes(b"not an image")
    result = runner.invoke(app, ["train-tokenizer", str(root), "--config", "tiny-vqgan", "--out", str(tmp_path / "run"),
                                 "--device", "cpu", "train.num_workers=1", "train.steps=1"])
    line = _one_line_error(result, "could be decoded")
    assert "DataLoader worker" not in line and "Original Traceback" not in line


# ------------------------------------------------------------------------------------- 15.8 cleanup


def test_leftovers_of_a_killed_run_are_removed_and_listed_at_the_next_start(tmp_path, tokens, tok_dir):
    run = tmp_path / "run"
    assert _train_ar(tokens, tok_dir, run, "train.ckpt_every=1", "train.keep_last=5").exit_code == 0
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000001", "step-00000002"]
    (ckpts / ".step-00000003.tmp-0123abcd").mkdir()  # killed while writing step 3
    (ckpts / ".step-00000003.tmp-0123abcd" / "state.pt").write_bytes(b"partial")
    half = ckpts / "step-00000001"
    (half / "meta.json").unlink()  # killed while pruning step 1 (older vqtok deleted in place)
    (ckpts / ".step-00000000.pruning").mkdir()
    result = _train_ar(tokens, tok_dir, run, "train.steps=3", "--resume", "auto")
    assert result.exit_code == 0, result.output
    assert "removed leftovers of an interrupted run" in result.output
    for name in ("checkpoints/.step-00000003.tmp-0123abcd", "checkpoints/step-00000001 (half-deleted)",
                 "checkpoints/.step-00000000.pruning"):
        assert name in result.output, result.output
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002", "step-00000003"]


def test_overwrite_replaces_only_directories_the_command_made(tmp_path, generator, tokens, tok_dir, images):
    dataset = _copy(images, tmp_path / "dataset")
    before = _snapshot(dataset)
    for argv in (
        ["convert", str(generator / "model.safetensors"), "--out", str(dataset), "--arch", "rar", "--overwrite"],
        ["sample", "--ckpt", str(generator), "--out", str(dataset), "--tokens-only", "--num-samples", "1", "--overwrite", "--device", "cpu"],
        ["demo-data", str(dataset), "--overwrite"],
        _encode_args(images, tok_dir, dataset, "--overwrite"),
    ):
        _one_line_error(runner.invoke(app, argv))
    assert _snapshot(dataset) == before
    # a directory the same command made is replaced
    conv = tmp_path / "conv"
    convert = ["convert", str(generator / "model.safetensors"), "--out", str(conv), "--arch", "rar"]
    assert runner.invoke(app, convert).exit_code == 0
    assert runner.invoke(app, [*convert, "--overwrite"]).exit_code == 0
    sampled = tmp_path / "sampled"
    sample = ["sample", "--ckpt", str(generator), "--out", str(sampled), "--tokens-only", "--num-samples", "1", "--device", "cpu"]
    assert runner.invoke(app, sample).exit_code == 0
    assert runner.invoke(app, [*sample, "--overwrite"]).exit_code == 0
