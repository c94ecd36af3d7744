"""Every DataLoader worker over the token shard stream yields samples (an idle worker would be invisible to a
test that only counts the batches that arrive: the DataLoader quietly skips a worker that ends at once).

Each item is tagged inside the worker process with that worker's id, so the test sees who produced what.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vqtok.data.token_shards import MANIFEST, TokenShardWriter, open_token_dataset

VIEWS, TOKENS = 2, 4


class TaggedByWorker(IterableDataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        worker = get_worker_info().id  # runs in the worker process
        for tokens, cls in self.dataset:
            yield worker, tokens, cls


def _shards(root, counts: list[int]) -> dict[int, np.ndarray]:
    rows, start = {}, 0
    for index, n in enumerate(counts):
        w = TokenShardWriter(root, index, "wds", np.uint16, VIEWS, TOKENS)
        for i in range(start, start + n):
            t = (np.arange(VIEWS * TOKENS).reshape(VIEWS, TOKENS) + 100 * i).astype(np.uint16)
            w.write(f"img_{i:04d}", t, i % 3)
            rows[i] = t
        w.close()
        start += n
    manifest = {"format": "wds", "version": 1, "dtype": "uint16", "views": [f"v{i}" for i in range(VIEWS)],
                "tokenizer": {"vocab_size": 4096, "tokens_per_view": TOKENS}, "classes": ["a", "b", "c"],
                "num_samples": start, "num_skipped": 0,
                "shards": [{"name": f"tokens-{i:06d}.tar", "count": n} for i, n in enumerate(counts)]}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return rows


def _check(item_tokens: torch.Tensor, cls: torch.Tensor, rows: dict[int, np.ndarray]) -> int:
    i = int(item_tokens.flatten()[0]) // 100
    assert int(cls) == i % 3
    assert any(np.array_equal(item_tokens.numpy(), rows[i][v].astype(np.int64)) for v in range(VIEWS))
    return i


@pytest.mark.parametrize("counts", [[6], [3, 2, 4]], ids=["one-shard", "three-shards"])
def test_every_worker_of_the_resampled_training_stream_yields_samples(tmp_path, counts):
    rows = _shards(tmp_path, counts)
    _, ds = open_token_dataset(tmp_path, view="random", shuffle_buffer=4, seed=1)
    loader = DataLoader(TaggedByWorker(ds), batch_size=None, num_workers=2)
    it = iter(loader)
    items = [next(it) for _ in range(40)]
    per_worker = {w: [_check(t, c, rows) for ww, t, c in items if ww == w] for w in (0, 1)}
    assert all(len(v) >= 10 for v in per_worker.values()), {w: len(v) for w, v in per_worker.items()}
    assert set(per_worker[0]) | set(per_worker[1]) == set(rows)  # and between them every sample comes up


def test_single_pass_stream_splits_shards_between_workers_without_loss_or_repeats(tmp_path):
    rows = _shards(tmp_path, [3, 2, 4, 1])
    _, ds = open_token_dataset(tmp_path, view=0, resampled=False, shuffle_buffer=0)
    items = list(DataLoader(TaggedByWorker(ds), batch_size=None, num_workers=2))
    per_worker = {w: [_check(t, c, rows) for ww, t, c in items if ww == w] for w in (0, 1)}
    assert per_worker[0] and per_worker[1], {w: len(v) for w, v in per_worker.items()}
    seen = per_worker[0] + per_worker[1]
    assert sorted(seen) == sorted(rows)  # each sample exactly once
