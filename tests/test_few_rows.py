"""linear_few_rows: the decode head's transposed product on CPU equals nn.Linear to float rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vqtok.ar import llamagen
from vqtok.ar.few_rows import MIN_WEIGHT, linear_few_rows, uses_transposed_product
from vqtok.ar.sampling import InverseCDFDraw, SamplingConfig, sample

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("bias", [False, True])
def test_transposed_product_equals_the_linear_layer(bias):
    torch.manual_seed(0)
    layer = nn.Linear(256, MIN_WEIGHT // 256, bias=bias)
    if bias:
        nn.init.normal_(layer.bias)
    x = torch.randn(2, 4, 1, 256)  # any leading shape, 8 rows
    assert uses_transposed_product(x, layer)
    got = linear_few_rows(x, layer)
    assert got.shape == (2, 4, 1, layer.out_features) and got.is_contiguous()
    torch.testing.assert_close(got, layer(x), atol=1e-5, rtol=1e-5)
    # many rows, a small weight, another dtype or autocast: nn.Linear itself
    assert not uses_transposed_product(torch.randn(65, 256), layer)
    assert not uses_transposed_product(x, nn.Linear(256, 16))
    assert not uses_transposed_product(x.double(), layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_transposed_product(x, layer)


def test_a_large_vocabulary_generator_decodes_as_its_full_forward():
    # 16384 codes x dim 64 puts LlamaGen's decode head on the transposed product; the cached and static decoders
    # still give the full recompute's tokens and (to rounding) its distributions
    cfg = llamagen.LlamaGenConfig(dim=64, n_layer=1, n_head=2, vocab_size=16384, block_size=16, num_classes=5)
    model = llamagen.LlamaGen(cfg).eval()
    with torch.no_grad():
        model.output.weight.normal_(0, 0.5)
    assert uses_transposed_product(torch.zeros(3, 1, 64), model.output)
    classes = torch.tensor([1, 2, 3])
    sc = SamplingConfig(guidance_scale=2.0, top_k=50)
    uniforms = torch.rand(3, 16, generator=torch.Generator().manual_seed(1))
    outs = [sample(model, classes, sc, draw=InverseCDFDraw(uniforms), decoder=d, return_probs=True)
            for d in (llamagen.FullRecompute(model), llamagen.CachedDecoder(model), llamagen.StaticDecoder(model, 3, True))]
    for out in outs[1:]:
        assert torch.equal(out.tokens, outs[0].tokens)
        torch.testing.assert_close(out.probs, outs[0].probs, atol=1e-5, rtol=1e-4)
    assert torch.equal(outs[1].probs, outs[2].probs)  # the eager and the static cache: bitwise
