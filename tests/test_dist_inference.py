"""No collective in any inference path, so encode and sample under torchrun finish with any
split of the work (ranks with unequal numbers of batches), also after a kill and a resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import smooth_photo
from vqtok.cli import app
from vqtok.data.token_shards import iter_samples, read_manifest

runner = CliRunner()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _folder(root: Path, n: int) -> Path:
    for i in range(n):
        d = root / "train" / f"n0{i % 3}000000"
        d.mkdir(parents=True, exist_ok=True)
        smooth_photo(90 + 7 * i, 70 + 3 * i, i).save(d / f"img_{i:03d}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def guarded_tokenizer(tmp_path_factory):
    """tiny-vqgan with the recipe's guards (their buffers in the checkpoint), trained one step so the
    guards have state; inference must not touch any of it."""
    from vqtok.tokenizer.tokenizer import Tokenizer, tokenizer_config_from_dict

    torch.manual_seed(0)
    cfg = tokenizer_config_from_dict({"preset": "tiny-vqgan", "quantizer": {"params": {
        "kmeans_init": True, "dead_code_threshold": 0.1, "ema_decay": 0.9}}})
    tok = Tokenizer(cfg).train()
    tok(torch.rand(4, 3, 64, 64))
    tok.quantize.update_codebook()
    return str(tok.eval().save(tmp_path_factory.mktemp("tok") / "tiny"))


def _torchrun(*args, **kw):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vqtok", *map(str, args)]


def _one_process(*args):
    # a separate process with the ranks' thread count: float reductions (and so near-tie code choices) depend
    # on the number of threads, and the byte comparison below is about the work split, not about threading
    proc = subprocess.run([sys.executable, "-m", "vqtok", *map(str, args)], env=ENV, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def _same_shards(a: Path, b: Path) -> None:
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma["shards"] == mb["shards"] and ma["num_samples"] == mb["num_samples"]
    for shard in ma["shards"]:
        assert (a / shard["name"]).read_bytes() == (b / shard["name"]).read_bytes(), shard["name"]


def test_two_process_encode_with_unequal_batches_per_rank_finishes(tmp_path, guarded_tokenizer):
    # 9 images in shards of 4 -> shards of 4, 4, 1: one rank has more batches than the other. A quantizer
    # that all-reduced its usage in every forward would make this run hang forever.
    data = _folder(tmp_path / "in", 9)
    args = [data, "--tokenizer", guarded_tokenizer, "--size", 64, "--shard-size", 4, "--batch-size", 2,
            "--workers", 0, "--device", "cpu"]
    _one_process("encode", *args, "--out", tmp_path / "one")
    proc = subprocess.run(_torchrun("encode", *args, "--out", tmp_path / "two"), env=ENV, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert read_manifest(tmp_path / "two")["num_samples"] == 9
    _same_shards(tmp_path / "one", tmp_path / "two")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, IndexError, ValueError, ProcessLookupError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the torchrun ranks through /proc")
def test_two_process_encode_resumes_after_a_kill(tmp_path, guarded_tokenizer):
    data = _folder(tmp_path / "in", 13)
    args = [data, "--tokenizer", guarded_tokenizer, "--ten-crop", "--size", 64, "--shard-size", 1, "--batch-size", 1,
            "--workers", 0, "--device", "cpu"]
    out = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun("encode", *args, "--out", out), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and len(list(out.glob("tokens-*.tar"))) < 2:
        time.sleep(0.05)
    victims = _descendants(proc.pid)  # the launcher and both ranks (torchrun gives ranks their own groups)
    for pid in [proc.pid, *victims]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for pid in victims:  # wait until the ranks are really gone before looking at the output
        while Path(f"/proc/{pid}").exists() and "Z" not in _state(pid):
            time.sleep(0.05)
    assert not (out / "manifest.json").exists(), "encode finished before it could be killed; make the job larger"
    done_before = len(list(out.glob("tokens-*.tar")))
    assert 0 < done_before < 13
    # the resume recreates an imbalance: the remaining shards rarely split evenly over the two ranks
    rerun = subprocess.run(_torchrun("encode", *args, "--out", out), env=ENV, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout
    clean = tmp_path / "clean"
    _one_process("encode", *args, "--out", clean)
    _same_shards(clean, out)


def test_two_process_sample_with_a_label_count_not_divisible_by_the_batch(tmp_path, guarded_tokenizer):
    from vqtok.ar.checkpoint import save_generator
    from vqtok.ar.rar import RAR, RARConfig
    from vqtok.tokenizer.tokenizer import load_tokenizer

    cfg = RARConfig(hidden_size=32, depth=2, num_heads=2, intermediate_size=64, vocab_size=512, seq_len=64,
                    num_classes=5, dropout=0.0, attn_dropout=0.0, class_dropout=0.0)
    torch.manual_seed(0)
    model = RAR(cfg).eval()
    gen = tmp_path / "gen"
    save_generator(gen, model, cfg, load_tokenizer(guarded_tokenizer).identity())
    # 7 labels over 2 ranks in batches of 3: rank 0 runs 2 batches (4 images), rank 1 runs 1 (3 images)
    args = ["sample", "--ckpt", gen, "--tokenizer", guarded_tokenizer, "--classes", "0,1,2,3,4,0,1",
            "--batch-size", 3, "--cfg", "2.0", "--npz", "--device", "cpu"]
    _one_process(*args, "--out", tmp_path / "one")
    proc = subprocess.run(_torchrun(*args, "--out", tmp_path / "two"), env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert a["arr_0"].shape[0] == 7
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


def _forward_worker(rank, world, init_file, out):
    from datetime import timedelta

    import torch.distributed as dist

    from vqtok.tokenizer.quantizers.fsq import FSQ
    from vqtok.tokenizer.quantizers.lfq import LFQ
    from vqtok.tokenizer.quantizers.multiscale import MultiScaleResidualVQ
    from vqtok.tokenizer.quantizers.vq import VectorQuantizer

    # a short timeout turns a deadlock (a collective only one rank reaches) into an error instead of a hang
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=20))
    try:
        quantizers = [VectorQuantizer(codebook_size=16, dim=4, kmeans_init=True, dead_code_threshold=1.0, ema=True),
                      MultiScaleResidualVQ(codebook_size=16, dim=4, patch_nums=(1, 2), dead_code_threshold=1.0,
                                           kmeans_init=True),
                      FSQ(levels=[4, 4]), LFQ(codebook_size=16, entropy_weight=0.1)]
        # rank 1 runs three times as many forwards as rank 0, in eval mode and (except LFQ's entropy term,
        # a training loss that is all-reduced by design) in train mode
        for q in quantizers:
            for training in (False, True):
                if training and isinstance(q, LFQ):
                    continue
                q.train(training)
                for _ in range(1 + 2 * rank):
                    with torch.no_grad():
                        q(torch.randn(2, q.dim, 2, 2))
        # the one place the guards communicate: update_codebook, once per step on every rank
        for q in quantizers:
            q.update_codebook()
        dist.barrier()
        out[rank] = True
    finally:
        dist.destroy_process_group()


def test_quantizer_forwards_issue_no_collective(tmp_path):
    import torch.multiprocessing as mp

    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_forward_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    assert dict(out) == {0: True, 1: True}
