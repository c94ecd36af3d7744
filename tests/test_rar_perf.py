"""The CPU fast paths of vqtok/ar/rar.py compute what the plain torch ops compute."""

import torch
import torch.nn.functional as F

from vqtok.ar.rar import RAR, RARConfig, Dropout, causal_attention_with_dropout, group_conditions, one_query_attention

TINY = dict(hidden_size=32, depth=2, num_heads=4, intermediate_size=64, vocab_size=16, seq_len=16, num_classes=5)


def test_cpu_dropout_drops_p_scales_kept_and_backpropagates_through_the_same_mask():
    drop = Dropout(0.1).train()
    x = torch.ones(200_000, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.004
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d y / d x = mask / (1 - p)
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # driven by torch's generator: the same seed, the same mask
    assert not torch.equal(drop(x), y)
    assert drop.eval()(x) is x


def test_causal_attention_math_path_equals_sdpa_without_drops():
    q, k, v = torch.randn(3, 2, 4, 9, 8).unbind(0)
    got = causal_attention_with_dropout(q, k, v, 1e-9)  # below 2^-17: nothing is dropped
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6, rtol=1e-5)


def test_one_query_attention_over_a_strided_cache_slice_equals_sdpa():
    cache = torch.randn(2, 3, 20, 8, 8)
    k, v = cache[0][:, :, :11], cache[1][:, :, :11]
    q = torch.randn(3, 20, 1, 8)
    torch.testing.assert_close(one_query_attention(q, k, v), F.scaled_dot_product_attention(q, k, v),
                               atol=1e-6, rtol=1e-5)


def test_decode_shares_the_modulation_of_repeated_conditions_without_changing_logits():
    torch.manual_seed(0)
    model = RAR(RARConfig(**TINY)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.adaLN_modulation[1].weight.normal_(0, 0.5)
    cond = torch.cat([model.condition_ids(torch.tensor([1, 3, 1])), model.null_condition_ids(3)])
    orders = torch.randperm(16).expand(6, 16)
    tokens = torch.randint(0, 16, (6, 4))
    logits = []
    for share in (True, False):
        cache = model.new_cache(6)
        groups = group_conditions(cond) if share else (cond, None)
        if share:
            distinct, rows = groups
            assert distinct.shape[0] == 3 and torch.equal(distinct[rows], cond)
        with torch.no_grad():
            out = [model.prefill(cond, orders, cache, groups)]
            out += [model.decode_step(tokens[:, s - 1], s, orders, cache) for s in range(1, 5)]
        logits.append(torch.stack(out))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
