"""vqtok.ar.kv_cache.KVCache: the one cache RAR, LlamaGen and VAR decode over."""

import pytest
import torch

from vqtok.ar.kv_cache import KVCache


def test_update_writes_in_place_at_length_or_start_and_returns_the_filled_prefix():
    cache = KVCache(2, rows=3, heads=4, max_len=10, head_dim=8, device="cpu", dtype=torch.float32)
    addresses = [t.data_ptr() for t in cache.k + cache.v]
    k, v = torch.randn(3, 4, 5, 8), torch.randn(3, 4, 5, 8)
    got_k, got_v = cache.update(1, k, v)  # at length 0
    assert got_k.shape == (3, 4, 5, 8) and torch.equal(got_k, k) and torch.equal(got_v, v)
    cache.length = 5  # the caller advances length once every layer has written
    k2 = torch.randn(3, 4, 2, 8)
    got_k, _ = cache.update(1, k2, k2)
    assert got_k.shape == (3, 4, 7, 8) and torch.equal(got_k[:, :, :5], k) and torch.equal(got_k[:, :, 5:], k2)
    got_k, _ = cache.update(0, k2, k2, start=8)  # an explicit position (LlamaGen's slots)
    assert got_k.shape == (3, 4, 10, 8) and torch.equal(got_k[:, :, 8:], k2)
    assert [t.data_ptr() for t in cache.k + cache.v] == addresses  # nothing reallocated
    with pytest.raises(RuntimeError, match="KV cache overflow: 11 > 10 positions"):
        cache.update(0, k2, k2, start=9)


def test_zeroed_cache_starts_at_zero_in_the_requested_dtype():
    cache = KVCache(3, 2, 1, 4, 2, "cpu", torch.bfloat16, zeroed=True)
    assert len(cache.k) == len(cache.v) == 3 and cache.rows == 2 and cache.length == 0
    assert all(t.dtype == torch.bfloat16 and not t.any() for t in cache.k + cache.v)
