import math

import pytest
import torch

from vqtok.ar.orders import scan_order
from vqtok.ar.presets import SAMPLING_PRESETS, paper_sampling
from vqtok.ar.rar import RAR, RARConfig
from vqtok.ar.rar_decoding import CachedDecoder, FullRecompute, StaticDecoder
from vqtok.ar.sampling import (ForcedDraw, GeneratorDraw, InverseCDFDraw, SamplingConfig, _cdf_block,
                                _drop_ties_after_the_lowest, describe_sampling, filter_logits,
                                guidance_scale_at, guidance_schedule, inverse_cdf, keep_at_least, sample,
                                sorted_values)
from vqtok.errors import UserError


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed=0, **kw) -> RAR:
    base = dict(hidden_size=32, depth=2, num_heads=4, intermediate_size=64, vocab_size=23, seq_len=16,
                num_classes=5, dropout=0.0, attn_dropout=0.0, class_dropout=0.0)
    base.update(kw)
    model = RAR(RARConfig(**base))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero everywhere: the adaLN-Zero init would make every block the identity
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.4 if p.ndim > 1 else 0.1))
    return model.eval()


@pytest.mark.parametrize("order", ["row-major", "spiral-in", "z-curve"])
def test_kv_cache_equals_full_recomputation_token_by_token(order):
    model = make_model(order=order)
    classes = torch.tensor([0, 3, 4])
    cfg = SamplingConfig(guidance_scale=3.0, guidance_schedule="power-cosine", guidance_power=1.5, top_k=15)
    cached = sample(model, classes, cfg, generator=torch.Generator().manual_seed(7), return_probs=True)
    full = sample(model, classes, cfg, generator=torch.Generator().manual_seed(7), kv_cache=False, return_probs=True)
    assert torch.equal(cached.tokens, full.tokens)
    torch.testing.assert_close(cached.probs, full.probs, atol=1e-5, rtol=1e-4)
    assert len(set(cached.tokens.flatten().tolist())) > 3  # actually sampled something varied


def test_kv_cache_equals_full_recomputation_without_cfg_on_a_rectangular_grid():
    model = make_model(seq_len=12, grid=[3, 4], order="alternate")
    cfg = SamplingConfig(guidance_scale=0.0, temperature=0.8, top_p=0.9)
    a = sample(model, torch.tensor([1, 2]), cfg, generator=torch.Generator().manual_seed(1))
    b = sample(model, torch.tensor([1, 2]), cfg, generator=torch.Generator().manual_seed(1), kv_cache=False)
    assert torch.equal(a.tokens, b.tokens) and a.tokens.shape == (2, 12)


def test_cached_probs_match_teacher_forced_forward():
    # the distribution at step t with forced tokens equals the training forward's output at slot t
    model = make_model(order="spiral-out")
    tokens = torch.randint(0, 23, (2, 16))
    classes = torch.tensor([1, 2])
    out = sample(model, classes, SamplingConfig(guidance_scale=0.0), forced_tokens=tokens, return_probs=True)
    assert torch.equal(out.tokens, tokens)  # returned in raster order whatever the generation order
    orders = scan_order("spiral-out", 4, 4).expand(2, 16)
    with torch.no_grad():
        logits, _ = model(tokens, classes, orders)
    torch.testing.assert_close(out.probs, logits[:, :-1].softmax(-1), atol=1e-6, rtol=1e-4)


def test_sampling_is_deterministic_under_a_seed():
    model = make_model()
    cfg = SamplingConfig(guidance_scale=2.0)
    classes = torch.tensor([0, 1])
    a = sample(model, classes, cfg, generator=torch.Generator().manual_seed(5)).tokens
    b = sample(model, classes, cfg, generator=torch.Generator().manual_seed(5)).tokens
    c = sample(model, classes, cfg, generator=torch.Generator().manual_seed(6)).tokens
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_temperature_zero_is_greedy():
    model = make_model()
    out = sample(model, torch.tensor([2]), SamplingConfig(guidance_scale=1.5, temperature=0.0), return_probs=True)
    assert torch.equal(out.tokens, out.probs.argmax(-1))  # raster order, so generation order == raster
    assert torch.equal(out.probs.sum(-1), torch.ones(1, 16))


@pytest.mark.parametrize("name,expected", [
    ("rar-b", [1.0, 1.02, 1.8, 7.4, 16.0]),
    ("rar-l", [1.0, 1.03, 2.09, 7.96, 15.5]),
    ("rar-xl", [1.0, 1.22, 2.64, 5.29, 6.9]),
    ("rar-xxl", [1.0, 1.6, 3.79, 6.63, 8.0]),
])
def test_power_cosine_values_for_the_paper_presets(name, expected):
    schedule = guidance_schedule(paper_sampling(name), 256)
    got = [schedule[s].item() for s in (0, 64, 128, 192, 255)]
    assert got == pytest.approx(expected, abs=0.01)
    assert SAMPLING_PRESETS[name].guidance_schedule == "power-cosine"


def test_schedule_edge_cases():
    # pow 0 is constant, step 0 included (0**0 = 1); step/N never reaches 1
    assert guidance_schedule(SamplingConfig(guidance_scale=4.0, guidance_schedule="power-cosine", guidance_power=0.0), 256).unique().tolist() == [4.0]
    assert guidance_scale_at(255, 256, 4.0, "power-cosine", 2.75).item() < 4.0
    lin = guidance_schedule(SamplingConfig(guidance_scale=3.0, guidance_schedule="linear"), 4)
    assert lin.tolist() == pytest.approx([1.0, 1.5, 2.0, 2.5])
    assert guidance_scale_at(10, 256, 2.5).item() == 2.5
    assert not SamplingConfig(guidance_scale=1.0).uses_cfg and not SamplingConfig(guidance_scale=0.0).uses_cfg
    assert SamplingConfig(guidance_scale=1.0, guidance_schedule="power-cosine", guidance_power=1.0).uses_cfg


def test_top_k_keeps_exactly_k():
    logits = torch.randn(4, 50)
    kept = filter_logits(logits, top_k=7).isfinite()
    assert kept.sum(-1).tolist() == [7] * 4
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(7).indices, True))


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    assert filter_logits(logits, top_p=0.8).isfinite().tolist() == [[True, False, True, False]]
    assert filter_logits(logits, top_p=0.81).isfinite().tolist() == [[True, False, True, True]]
    assert filter_logits(logits, top_p=0.1).isfinite().tolist() == [[True, False, False, False]]
    assert filter_logits(logits, top_p=1.0).isfinite().all()


def _top_k_then_top_p_by_full_sort(logits, top_k, top_p):
    logits = logits.masked_fill(logits < logits.topk(top_k, dim=-1).values[..., -1:], float("-inf"))
    sorted_logits, idx = logits.sort(dim=-1, descending=True, stable=True)  # equal logits: lowest index first
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
    return logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted), float("-inf"))


def test_top_p_after_top_k_equals_sorting_the_whole_row():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 4096, generator=g) * 3
    for top_k, top_p in [(900, 0.96), (50, 0.5), (4095, 0.9), (1, 0.3)]:
        want = _top_k_then_top_p_by_full_sort(logits, top_k, top_p)
        assert torch.equal(filter_logits(logits, top_k, top_p), want)
    tied = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, -2.0]])  # three logits tie at the k-th value: all stay
    want = _top_k_then_top_p_by_full_sort(tied, 2, 0.99)
    assert torch.equal(filter_logits(tied, 2, 0.99), want)
    assert filter_logits(tied, 2, 0.99).isfinite().sum().item() == 4
    # a tie in some rows of a batch: those rows keep every tied logit, the others exactly k, each row as alone
    batch = logits[0, :4].clone()
    batch[1, batch[1].topk(901).indices[-2:]] = batch[1].topk(899).values[-1]  # ranks 900 and 901 tie rank 899
    batch[3, batch[3].topk(900).indices[-1]] = batch[3].topk(901).values[-1]  # rank 900 ties rank 901
    kth = batch.topk(900).values[:, -1:]
    assert (batch >= kth).sum(-1).tolist() == [900, 901, 900, 901]
    got = filter_logits(batch, 900, 0.96)
    for r in range(4):
        assert torch.equal(got[r], _top_k_then_top_p_by_full_sort(batch[r:r + 1], 900, 0.96)[0]), r
    assert torch.equal(got, _top_k_then_top_p_by_full_sort(batch, 900, 0.96))
    assert (got[[0, 2]].isfinite().sum(-1) <= 900).all()


def test_top_p_after_top_k_with_bf16_ties_equals_a_stable_sort_of_the_whole_row():
    # bf16 logits (a bf16 head) tie at the k-th value and at the top-p boundary in most rows: every logit
    # tied with the k-th stays, and of a group of equal logits the boundary cuts the lowest indices stay
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, 4096, generator=g) * 3).bfloat16().float()
    kth = logits.topk(900).values[:, -1:]
    assert (logits >= kth).sum(-1).gt(900).float().mean() > 0.5
    want = _top_k_then_top_p_by_full_sort(logits, 900, 0.96)
    smallest_kept = want.masked_fill(want.isinf(), float("inf")).amin(-1, keepdim=True)
    assert ((logits == smallest_kept) & want.isinf()).any(-1).sum() > 32  # the boundary cuts a tie group
    assert torch.equal(filter_logits(logits, 900, 0.96), want)
    flipped = logits.flip(-1)  # the same rows, other indices: other members of each tie group stay
    assert torch.equal(filter_logits(flipped, 900, 0.96), _top_k_then_top_p_by_full_sort(flipped, 900, 0.96))
    # a group of three equal logits cut after its first: the lowest index stays
    probs = torch.tensor([[0.1, 0.3, 0.1, 0.4, 0.1]])
    assert filter_logits(probs.log(), 4, 0.75).isfinite().tolist() == [[True, True, False, True, False]]


def test_top_p_after_top_k_equals_a_stable_sort_on_random_tied_rows():
    g = torch.Generator().manual_seed(0)
    for trial in range(120):  # sizes, k, p and tie densities drawn at random: rounded logits tie everywhere
        V, R = int(torch.randint(2, 300, (1,), generator=g)), int(torch.randint(1, 20, (1,), generator=g))
        x = torch.randn(R, V, generator=g) * float(torch.rand(1, generator=g) * 5)
        x = [x, x.bfloat16().float(), x.round(), (x * 2).round() / 2][trial % 4]
        k, p = int(torch.randint(1, V, (1,), generator=g)), float(torch.rand(1, generator=g)) * 0.999 + 0.001
        assert torch.equal(filter_logits(x, k, p), _top_k_then_top_p_by_full_sort(x, k, p)), (trial, V, R, k, p)


def test_the_cpu_filter_paths_equal_the_generic_torch_ones():
    # float32 on the CPU sorts through numpy; float64 (and every other device) through torch.sort
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, 4096, generator=g) * 3
    x[0, 0, :5] = float("-inf")
    x[0, 1, 7] = float("nan")  # NaN sorts last (the largest), as in torch
    got, want = sorted_values(x), x.sort(dim=-1).values
    assert torch.equal(got[~got.isnan()], want[~want.isnan()]) and torch.equal(got.isnan(), want.isnan())
    y = x.nan_to_num(nan=0.0)
    for x32 in (y, y.bfloat16().float()):
        for top_k, top_p in [(900, 0.96), (1, 1.0), (77, 1.0), (4000, 0.5)]:
            assert torch.equal(filter_logits(x32, top_k, top_p), filter_logits(x32.double(), top_k, top_p).float())


def test_keep_at_least_is_exact_at_the_threshold():
    tiny = torch.finfo(torch.float32).smallest_normal * 2 ** -23  # the smallest subnormal
    x = torch.tensor([[1.0, 1.0 - 2 ** -24, 1.0 + 2 ** -23, float("-inf"), 3.0, float("inf")],
                      [0.0, -tiny, tiny, -0.0, float("-inf"), -5.0],
                      [-1e30, 2.0, float("-inf"), 0.5, -3.0, 7.0]])
    t = torch.tensor([[1.0], [0.0], [float("-inf")]])
    want = x.masked_fill(x < t, float("-inf"))
    assert torch.equal(keep_at_least(x, t), want)
    assert keep_at_least(x, t).isfinite().sum(-1).tolist() == [3, 3, 5]
    for dtype in (torch.float64, torch.bfloat16, torch.float16):  # no constant of one dtype's range
        xd, td = x.to(dtype), t.to(dtype)
        assert torch.equal(keep_at_least(xd, td), xd.masked_fill(xd < td, float("-inf"))), dtype
    nan = torch.tensor([[float("nan"), 2.0, float("inf")]])
    assert keep_at_least(nan, torch.tensor([[float("inf")]])).tolist()[0][1:] == [float("-inf"), float("inf")]
    assert keep_at_least(nan, torch.tensor([[0.0]]))[0, 0].isnan()  # a NaN logit stays, as with masked_fill


def test_dropping_the_ties_after_the_lowest_indices():
    x = torch.tensor([[2.0, 1.0, 3.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [5.0, 4.0, 4.0, 4.0, 9.0, 4.0]])
    _drop_ties_after_the_lowest(x, torch.tensor([1.0, 1.0, 4.0]), torch.tensor([2, 6, 1]))
    inf = float("-inf")
    assert x.tolist() == [[2.0, 1.0, 3.0, 1.0, inf, 0.0], [1.0] * 6, [5.0, 4.0, inf, inf, 9.0, inf]]


def _one_level_inverse_cdf(probs, uniforms):
    cdf = probs.double().cumsum(dim=-1)
    target = uniforms.double()[..., None] * cdf[..., -1:]
    return torch.searchsorted(cdf, target, right=True)[..., 0].clamp_max(probs.shape[-1] - 1)


def test_two_level_inverse_cdf_picks_the_token_of_the_whole_row_cdf():
    assert (_cdf_block(4096), _cdf_block(16384), _cdf_block(4100), _cdf_block(1000), _cdf_block(100)) == (64, 128, 0, 0, 0)
    g = torch.Generator().manual_seed(3)
    for V in (256, 4096, 16384, 1000):
        logits = torch.randn(2, 300, V, generator=g) * 4
        u = torch.rand(2, 300, generator=g, dtype=torch.float64)
        u[0, :2] = torch.tensor([0.0, 1.0 - 2 ** -53], dtype=torch.float64)
        for top_k, top_p in [(0, 1.0), (900, 0.96), (3, 1.0), (1, 1.0), (0, 0.5)]:
            for x in (logits, logits.bfloat16().float()):
                probs = filter_logits(x, min(top_k, V - 1), top_p).softmax(-1)
                got = inverse_cdf(probs, u)
                assert got.shape == (2, 300)
                assert torch.equal(got, _one_level_inverse_cdf(probs, u)), (V, top_k, top_p)
                assert (probs.gather(-1, got[..., None]) > 0).all()
    # mass at both sides of a block edge: a target on a CDF step moves past it and past the zeros after it
    probs = torch.zeros(4, 4096)
    probs[:, 63], probs[:, 64], probs[:, 4095] = 0.25, 0.25, 0.5
    u = torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=torch.float64)
    assert inverse_cdf(probs, u).tolist() == [63, 64, 4095, 4095] == _one_level_inverse_cdf(probs, u).tolist()


def test_sampled_tokens_respect_top_k():
    model = make_model()
    out = sample(model, torch.tensor([0, 1, 2, 3]), SamplingConfig(guidance_scale=2.0, top_k=1), return_probs=True)
    assert torch.equal((out.probs > 0).sum(-1), torch.ones(4, 16, dtype=torch.long))


def test_bad_sampling_settings_are_user_errors():
    model = make_model()
    with pytest.raises(UserError, match="class id 9"):
        sample(model, torch.tensor([9]))
    with pytest.raises(UserError, match="schedule"):
        SamplingConfig(guidance_schedule="cosine")
    with pytest.raises(UserError, match="top-p"):
        SamplingConfig(top_p=0.0)
    assert math.isclose(paper_sampling("rar-l").temperature, 1.02)
    with pytest.raises(UserError):
        paper_sampling("rar-tiny")


# ------------------------------------------------------------------- decoders, draws, static buffers


def _uniforms(batch, n, seed=0):
    return torch.rand(batch, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("cfg", [
    SamplingConfig(guidance_scale=3.0, guidance_schedule="power-cosine", guidance_power=1.5, top_k=15, top_p=0.95),
    SamplingConfig(guidance_scale=0.0, temperature=0.9),
], ids=["cfg", "no-cfg"])
def test_static_buffer_decoder_refilled_in_place_gives_the_eager_tokens(cfg):
    # the CUDA-graph layout on CPU: one StaticDecoder reused for successive batches, every input refilled in
    # place, must give exactly the tokens of the eager cached decoder and of the full recomputation
    model = make_model(order="spiral-out")
    order = scan_order("spiral-out", 4, 4)
    static = StaticDecoder(model, 3, cfg.uses_cfg, order)
    addresses = (static.cond_ids.data_ptr(), static.token.data_ptr(), static.cache.k[0].data_ptr())
    for seed, classes in enumerate([torch.tensor([0, 3, 3]), torch.tensor([4, 1, 2]), torch.tensor([2, 2, 2])]):
        u = _uniforms(3, 16, seed)
        eager = sample(model, classes, cfg, draw=InverseCDFDraw(u))
        full = sample(model, classes, cfg, draw=InverseCDFDraw(u), decoder=FullRecompute(model))
        graphed_style = sample(model, classes, cfg, draw=InverseCDFDraw(u), decoder=static, return_probs=True)
        assert torch.equal(graphed_style.tokens, eager.tokens) and torch.equal(eager.tokens, full.tokens)
        assert len(set(eager.tokens.flatten().tolist())) > 3
    assert (static.cond_ids.data_ptr(), static.token.data_ptr(), static.cache.k[0].data_ptr()) == addresses
    cond_ptr = static.cache.cond.data_ptr()
    sample(model, torch.tensor([1, 1, 0]), cfg, draw=InverseCDFDraw(_uniforms(3, 16)), decoder=static)
    assert static.cache.cond.data_ptr() == cond_ptr  # the condition buffer itself was refilled


def test_refilling_the_condition_buffer_in_place_changes_the_logits():
    # a decode step must read the conditions stored in the cache now, not a copy keyed on a tensor's identity
    model = make_model()
    orders = torch.arange(16).expand(4, 16)
    cond = torch.cat([model.condition_ids(torch.tensor([0, 1])), model.null_condition_ids(2)])
    cache = model.new_cache(4)
    with torch.no_grad():
        model.prefill(cond, orders, cache)
        token = torch.tensor([5, 6, 5, 6])
        before = model.decode_step(token, 1, orders, cache)
        buffer = cache.cond
        other = model.embeddings(torch.cat([model.condition_ids(torch.tensor([3, 4])), model.null_condition_ids(1)]))
        buffer.copy_(other)  # same tensor object, new contents
        cache.length = 2  # step 1 again: it writes slot 2
        after = model.decode_step(token, 1, orders, cache)
    assert cache.cond is buffer
    assert not torch.allclose(before[:2], after[:2])  # the conditional rows now see classes 3 and 4
    torch.testing.assert_close(before[2:], after[2:])  # the null rows did not change


def test_a_static_decoder_refilled_with_other_classes_samples_those_classes():
    model = make_model()
    cfg = SamplingConfig(guidance_scale=2.0, temperature=0.0)
    static = StaticDecoder(model, 2, True, torch.arange(16))
    first = sample(model, torch.tensor([0, 1]), cfg, decoder=static).tokens
    second = sample(model, torch.tensor([3, 4]), cfg, decoder=static).tokens
    assert not torch.equal(first, second)
    assert torch.equal(second, sample(model, torch.tensor([3, 4]), cfg).tokens)
    with pytest.raises(ValueError, match="static decoder"):
        sample(model, torch.tensor([3]), cfg, decoder=static)


def test_draws_plug_into_the_one_loop():
    model = make_model()
    cfg = SamplingConfig(guidance_scale=2.0, top_k=10)
    classes = torch.tensor([1, 2])
    # GeneratorDraw is the default draw of `generator=`
    a = sample(model, classes, cfg, draw=GeneratorDraw(torch.Generator().manual_seed(3))).tokens
    assert torch.equal(a, sample(model, classes, cfg, generator=torch.Generator().manual_seed(3)).tokens)
    # ForcedDraw takes generation-order tokens; forced_tokens= takes raster ones
    forced = sample(model, classes, cfg, draw=ForcedDraw(a), return_probs=True)
    assert torch.equal(forced.tokens, a)
    # inverse CDF: each row depends on its own uniforms only
    u = _uniforms(2, 16, 4)
    pair = sample(model, classes, cfg, draw=InverseCDFDraw(u)).tokens
    alone = sample(model, classes[1:], cfg, draw=InverseCDFDraw(u[1:])).tokens
    assert torch.equal(pair[1:], alone)
    with pytest.raises(ValueError, match="not both"):
        sample(model, classes, cfg, draw=InverseCDFDraw(u), generator=torch.Generator())


def test_the_cached_decoder_reuses_its_cache_across_batches_of_the_same_size():
    model = make_model()
    decoder = CachedDecoder(model)
    cfg = SamplingConfig(guidance_scale=2.0, temperature=0.0)
    sample(model, torch.tensor([0, 1]), cfg, decoder=decoder)
    cache = decoder.cache
    again = sample(model, torch.tensor([3, 3]), cfg, decoder=decoder).tokens  # grouping changes: 2 distinct rows
    assert decoder.cache is cache and torch.equal(again, sample(model, torch.tensor([3, 3]), cfg).tokens)


def _tiny_llamagen():
    from vqtok.ar.llamagen import LlamaGen, LlamaGenConfig

    torch.manual_seed(0)
    model = LlamaGen(LlamaGenConfig(dim=32, n_layer=2, n_head=4, vocab_size=40, block_size=16, num_classes=10,
                                    multiple_of=16, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0))
    with torch.no_grad():
        model.output.weight.normal_(0, 0.5)  # zero at init
    return model.eval()


@pytest.mark.parametrize("family", ["rar", "llamagen"])
def test_a_cached_decoder_builds_a_new_cache_when_the_precision_changes(family):
    # the cache follows the attention dtype: reused while rows, device and precision stay, rebuilt in bf16
    # under bf16 autocast and in float32 after it, with the tokens of a fresh decoder at each precision
    model = make_model() if family == "rar" else _tiny_llamagen()
    classes = torch.tensor([0, 1, 3])
    cfg = SamplingConfig(guidance_scale=2.0, temperature=0.0)
    decoder = model.default_decoder(True)
    fp32 = sample(model, classes, cfg, decoder=decoder).tokens
    cache = decoder.cache
    assert cache.k[0].dtype == torch.float32
    sample(model, classes, cfg, decoder=decoder)
    assert decoder.cache is cache
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = sample(model, classes, cfg, decoder=decoder).tokens
        assert decoder.cache.k[0].dtype == decoder.cache.v[-1].dtype == torch.bfloat16
        assert torch.equal(bf16, sample(model, classes, cfg, decoder=model.default_decoder(True)).tokens)
    assert torch.equal(sample(model, classes, cfg, decoder=decoder).tokens, fp32)
    assert decoder.cache.k[0].dtype == torch.float32


def test_describe_sampling_names_the_resolved_settings():
    paper = paper_sampling("rar-b")
    line = describe_sampling(paper, 256)
    assert "power-cosine, power 2.75, scale 16" in line and "step 0: 1" in line and "temperature 1" in line
    assert "top-k off" in line and "top-p off" in line
    line = describe_sampling(SamplingConfig(guidance_scale=3.0, temperature=0.0, top_k=5, top_p=0.9), 16)
    assert line == "guidance constant 3; temperature 0 (argmax); top-k 5; top-p 0.9"
    assert describe_sampling(SamplingConfig(guidance_scale=0.0), 16).startswith("guidance off")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("guided", [True, False])
def test_cuda_graph_decoder_gives_the_eager_tokens_on_cuda(guided):
    from vqtok.ar.cuda_graphs import CUDAGraphDecoder

    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model = make_model(order="spiral-in").cuda()
        cfg = SamplingConfig(guidance_scale=3.0 if guided else 0.0, guidance_schedule="power-cosine",
                             guidance_power=1.5, top_k=15)
        graphed = CUDAGraphDecoder(model, 3, cfg.uses_cfg, scan_order("spiral-in", 4, 4))
        assert len(graphed.graphs) == 15
        for seed, classes in enumerate([torch.tensor([0, 3, 3]), torch.tensor([4, 1, 2])]):
            u = _uniforms(3, 16, seed)
            eager = sample(model, classes, cfg, draw=InverseCDFDraw(u))
            replayed = sample(model, classes, cfg, draw=InverseCDFDraw(u), decoder=graphed, return_probs=True)
            assert torch.equal(replayed.tokens, eager.tokens)
            again = sample(model, classes, cfg, draw=InverseCDFDraw(u), decoder=graphed, return_probs=True)
            assert torch.equal(again.probs, replayed.probs)  # replays are deterministic
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


# ------------------------------------------------------------------ multi-token steps (VAR-style families)


class _ScaleModel(torch.nn.Module):
    """A toy family whose steps emit 1, 4 and 9 tokens: logits depend on the class and on every token fed
    back so far, so a wrong offset, a wrong feed-back or a wrong CFG row layout changes the result."""

    steps = [1, 4, 9]

    def __init__(self, vocab=7, classes=5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.cls = torch.nn.Parameter(torch.randn(classes + 1, vocab, generator=g))
        self.tok = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))
        self.num_classes = classes

    def generation_steps(self):
        return list(self.steps)

    def generation_order(self, name=None):
        return None

    def condition_ids(self, class_ids):
        return class_ids.long()

    def null_condition_ids(self, batch, device=None):
        return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)

    def default_decoder(self, kv_cache=True):
        return _ScaleDecoder(self)


class _ScaleDecoder:
    def __init__(self, model):
        self.model, self.fed = model, []

    def start(self, cond_ids, order):
        assert order is None
        self.cond, self.state = cond_ids, self.model.cls[cond_ids]
        return self.state[:, None].expand(-1, 1, -1)

    def step(self, tokens, step):
        self.fed.append(tokens.clone())
        self.state = self.state + self.model.tok[tokens].mean(1)
        n = _ScaleModel.steps[step]  # the class's sizes, whatever the model instance claims
        return (self.state[:, None] + torch.arange(n)[None, :, None] * 0.1).expand(-1, n, -1)


def test_ramp_schedule_is_vars_linear_rise_from_1_to_scale():
    scales = guidance_schedule(SamplingConfig(guidance_scale=2.5, guidance_schedule="ramp"), 4)
    torch.testing.assert_close(scales, torch.tensor([1.0, 1.5, 2.0, 2.5]))
    assert "guidance ramp, scale 2.5" in describe_sampling(SamplingConfig(guidance_scale=2.5, guidance_schedule="ramp"), 4)


def test_multi_token_steps_feed_back_offsets_and_cfg_rows():
    model = _ScaleModel()
    classes = torch.tensor([0, 3])
    cfg = SamplingConfig(guidance_scale=2.0, guidance_schedule="ramp", top_k=4)
    # the generator draw makes one multinomial call per step on (B * n, V)
    calls = []
    real = torch.multinomial

    def spy(probs, n, generator=None):
        calls.append(tuple(probs.shape))
        return real(probs, n, generator=generator)

    decoder = _ScaleDecoder(model)
    try:
        torch.multinomial = spy
        out = sample(model, classes, cfg, draw=GeneratorDraw(torch.Generator().manual_seed(1)), decoder=decoder,
                     return_probs=True)
    finally:
        torch.multinomial = real
    assert calls == [(2, 7), (8, 7), (18, 7)]
    assert out.tokens.shape == (2, 14) and out.probs.shape == (2, 14, 7)
    # under CFG the fed-back tokens are the conditional draws repeated for the null rows
    assert [tuple(t.shape) for t in decoder.fed] == [(4, 1), (4, 4)]
    assert torch.equal(decoder.fed[0], torch.cat([out.tokens[:, :1]] * 2))
    assert torch.equal(decoder.fed[1], torch.cat([out.tokens[:, 1:5]] * 2))
    # teacher forcing on those tokens reproduces the distributions; inverse-CDF uniforms are read by position
    forced = sample(model, classes, cfg, forced_tokens=out.tokens, return_probs=True)
    assert torch.equal(forced.tokens, out.tokens)
    torch.testing.assert_close(forced.probs, out.probs)
    u = torch.rand(2, 14, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pair = sample(model, classes, cfg, draw=InverseCDFDraw(u)).tokens
    alone = sample(model, classes[1:], cfg, draw=InverseCDFDraw(u[1:])).tokens
    assert torch.equal(pair[1:], alone)
    # the kept set is the top 4 of each guided distribution
    assert ((out.probs > 0).sum(-1) <= 4).all()


def test_a_decoder_giving_the_wrong_token_count_is_an_error():
    model = _ScaleModel()
    model.steps = [1, 4, 8]  # the decoder still emits 9 logits at the last step
    with pytest.raises(ValueError, match="step 2 should give logits for 8 tokens"):
        sample(model, torch.tensor([1]), SamplingConfig(guidance_scale=0))


def test_family_registry_names_the_choices():
    from vqtok.ar.families import family_of, get_family

    assert get_family("rar").model_cls is RAR and family_of(make_model()).name == "rar"
    with pytest.raises(UserError, match="unknown generator architecture 'gpt'; choose one of rar"):
        get_family("gpt")
