"""Token shard writing (temp name then rename), reading, and the training datasets."""

import json

import numpy as np
import pytest
import torch

from vqtok.data.token_shards import (
    MANIFEST,
    TokenShardWriter,
    iter_samples,
    iter_tar_samples,
    merge_h5_parts,
    open_token_dataset,
    shard_is_complete,
    token_dtype,
)
from vqtok.errors import UserError


def test_token_dtype_switches_above_65536_codes():
    assert token_dtype(1024) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(2**18) == np.uint32


def _write_shard(out, index, fmt, n, views=3, tokens=5, start=0, dtype=np.uint16):
    w = TokenShardWriter(out, index, fmt, dtype, views, tokens)
    rows = []
    for i in range(start, start + n):
        t = (np.arange(views * tokens).reshape(views, tokens) + 100 * i).astype(dtype)
        w.write(f"img_{i:04d}", t, i % 4)
        rows.append((f"img_{i:04d}", t, i % 4))
    w.skip("bad_0", "/x/bad.JPEG", "empty file (0 bytes)")
    return w, rows


@pytest.mark.parametrize("fmt", ["wds", "h5"])
def test_shard_is_final_only_after_close(tmp_path, fmt):
    w, rows = _write_shard(tmp_path, 0, fmt, 4)
    assert not shard_is_complete(tmp_path, 0, fmt)
    w.close()
    assert shard_is_complete(tmp_path, 0, fmt)
    assert not list(tmp_path.rglob(".*.tmp"))
    side = json.loads((tmp_path / "progress" / "tokens-000000.json").read_text())
    assert side["count"] == 4 and side["skipped"][0]["reason"] == "empty file (0 bytes)"
    if fmt == "wds":
        got = list(iter_tar_samples(tmp_path / "tokens-000000.tar"))
        assert [g[0] for g in got] == [r[0] for r in rows]
        assert all(np.array_equal(g[1], r[1]) and g[1].dtype == np.uint16 and g[2] == r[2] for g, r in zip(got, rows))


def test_writer_rejects_wrong_shape_or_dtype(tmp_path):
    w = TokenShardWriter(tmp_path, 0, "wds", np.uint16, 2, 4)
    with pytest.raises(ValueError):
        w.write("a", np.zeros((2, 5), np.uint16), 0)
    with pytest.raises(ValueError):
        w.write("a", np.zeros((2, 4), np.int64), 0)


def _manifest(out, fmt, shards, views=3, tokens=5):
    m = {"format": fmt, "version": 1, "dtype": "uint16", "views": [f"v{i}" for i in range(views)],
         "tokenizer": {"vocab_size": 4096, "tokens_per_view": tokens}, "classes": ["a", "b", "c", "d"],
         "num_samples": sum(c for _, c in shards), "num_skipped": 0,
         "shards": [{"name": n, "count": c} for n, c in shards]}
    (out / MANIFEST).write_text(json.dumps(m))
    return m


def test_stream_resamples_so_every_worker_gets_data_with_one_shard(tmp_path):
    w, rows = _write_shard(tmp_path, 0, "wds", 6)
    w.close()
    _manifest(tmp_path, "wds", [("tokens-000000.tar", 6)])
    manifest, ds = open_token_dataset(tmp_path, view="random", shuffle_buffer=4, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    it = iter(loader)
    batches = [next(it) for _ in range(6)]  # more than one pass: the stream never runs dry
    tokens = torch.cat([b[0] for b in batches])
    assert tokens.shape == (24, 5) and tokens.dtype == torch.int64
    by_key = {int(r[1][0, 0]) // 100: r for r in rows}
    views_seen = set()
    for t, c in zip(tokens, torch.cat([b[1] for b in batches])):
        i = int(t[0]) // 100
        match = [v for v in range(3) if np.array_equal(by_key[i][1][v].astype(np.int64), t.numpy())]
        assert match and int(c) == by_key[i][2]
        views_seen.add(match[0])
    assert len(views_seen) > 1  # views are drawn at random


def test_single_pass_stream_and_all_views(tmp_path):
    for k in range(3):
        w, _ = _write_shard(tmp_path, k, "wds", 2, start=2 * k)
        w.close()
    _manifest(tmp_path, "wds", [(f"tokens-{k:06d}.tar", 2) for k in range(3)])
    _, ds = open_token_dataset(tmp_path, view="all", resampled=False, shuffle_buffer=0)
    items = list(ds)
    assert len(items) == 6 and items[0][0].shape == (3, 5)
    assert sorted(int(t[0, 0]) // 100 for t, _ in items) == list(range(6))


def test_h5_random_access_dataset(tmp_path):
    total = 0
    for k in range(2):
        w, _ = _write_shard(tmp_path, k, "h5", 3, start=3 * k)
        w.close()
        total += 3
    merge_h5_parts(tmp_path, 2, np.dtype(np.uint16), (3, 5), total)
    m = _manifest(tmp_path, "h5", [("tokens.h5", total)])
    _, ds = open_token_dataset(tmp_path, view=2)
    assert len(ds) == 6
    t, c = ds[4]
    assert torch.equal(t, torch.arange(10, 15) + 400) and int(c) == 0
    keys = [k for k, _, _ in iter_samples(tmp_path, m)]
    assert keys == [f"img_{i:04d}" for i in range(6)]


def test_open_token_dataset_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_token_dataset(tmp_path / "missing")
    (tmp_path / "progress").mkdir()
    with pytest.raises(UserError, match="rerun the same"):
        open_token_dataset(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        open_token_dataset(tmp_path)
