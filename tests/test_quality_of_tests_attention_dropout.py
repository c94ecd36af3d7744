"""Dropout on the attention weights at a real rate (p = 0.5), against a float64 reference with the same mask.

The mask is recovered by replaying torch's generator from the same seed through the same dropout on a
tensor of ones (kept elements become 1 / (1 - p), dropped ones 0), so the reference shares the mask and
nothing else: its attention is written here from the definition.
"""

import math

import torch

from vqtok.ar.rar import RAR, RARConfig, causal_attention_with_dropout, dropout

P = 0.5


def _mask(shape, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return dropout(torch.ones(shape), P, True)


def _reference(q, k, v, mask):
    q, k, v, mask = q.double(), k.double(), v.double(), mask.double()
    T = q.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) * mask) @ v


def test_attention_dropout_at_one_half_equals_the_reference_with_the_same_mask():
    q, k, v = (torch.randn(2, 3, 12, 8, dtype=torch.float32, requires_grad=True) for _ in range(3))
    mask = _mask((2, 3, 12, 12), seed=11)
    kept = (mask != 0).float().mean().item()
    assert 0.4 < kept < 0.6 and set(mask.unique().tolist()) == {0.0, 2.0}  # half dropped, the rest scaled by 2
    torch.manual_seed(11)
    got = causal_attention_with_dropout(q, k, v, P)
    want = _reference(q, k, v, mask)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # gradients flow through the same mask
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v), g)
    grads_ref = torch.autograd.grad(want, (q, k, v), g.double())
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-4)
    # and another seed is another mask, so the output really depends on it
    torch.manual_seed(12)
    assert not torch.allclose(causal_attention_with_dropout(q, k, v, P), got)


def test_rar_attention_layer_in_training_uses_that_dropout_on_its_weights():
    cfg = RARConfig(hidden_size=32, depth=1, num_heads=4, intermediate_size=64, vocab_size=16, seq_len=16,
                    num_classes=5, dropout=0.0, attn_dropout=P, class_dropout=0.0)
    attn = RAR(cfg).blocks[0].attn.train()
    x = torch.randn(2, 10, 32)
    torch.manual_seed(3)
    got = attn(x)
    B, T, D = x.shape
    q, k, v = attn.qkv(x).view(B, T, 3, 4, 8).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    heads = _reference(q, k, v, _mask((B, 4, T, T), seed=3))
    want = attn.proj(heads.transpose(1, 2).reshape(B, T, D).float())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    eval_out = attn.eval()(x)
    assert not torch.allclose(eval_out, got)  # p = 0.5 changes the output, and eval turns it off
