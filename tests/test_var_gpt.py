"""VAR next-scale generator: model behaviour on tiny CPU configs, official-weight loading, and conformance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vqtok.ar.var import VAR, VARCachedDecoder, VARConfig, VARFullRecompute, var_loss
from vqtok.errors import UserError
from vqtok.interop import var_gpt
from vqtok.tokenizer.quantizers.multiscale import MultiScaleResidualVQ, MultiScaleVQConfig
from vqtok.tokenizer.quantizers.vq import VectorQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")

PATCH = (1, 2, 3)


def tiny_quantizer(V: int = 16, dim: int = 4, patch_nums=PATCH) -> MultiScaleResidualVQ:
    q = MultiScaleResidualVQ(MultiScaleVQConfig(codebook_size=V, dim=dim, patch_nums=patch_nums))
    torch.nn.init.normal_(q.embedding.weight)
    return q.eval()


def tiny(shared_aln: bool = False, **kw) -> VAR:
    cfg = VARConfig(depth=2, embed_dim=32, num_heads=2, num_classes=10, vocab_size=16, codebook_dim=4,
                    patch_nums=list(PATCH), shared_aln=shared_aln, **kw)
    model = VAR(cfg, quantizer=tiny_quantizer())
    with torch.no_grad():  # random everything, so no zero init hides a path
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def tokens_for(model: VAR, B: int = 3) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (B, model.config.seq_len))


def test_from_depth_follows_the_release_rule():
    cfg = VARConfig.from_depth(16)
    assert (cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.ffn_hidden) == (1024, 16, 64, 4096)
    assert cfg.drop_path_rate == pytest.approx(0.1 * 16 / 24) and cfg.attn_l2_norm and not cfg.shared_aln
    assert cfg.seq_len == 680 and cfg.begin_ends[-1] == (424, 680) and cfg.null_class_id == 1000
    with pytest.raises(UserError, match="divisible"):
        VARConfig(embed_dim=30, num_heads=4)


def test_block_causal_attention_across_scales():
    model = tiny()
    labels = torch.tensor([1, 2, 3])
    x = model.teacher_forcing_input(tokens_for(model))
    ref = model(labels, x, drop_labels=False)
    first_l = model.config.first_l
    for k, (begin, end) in enumerate(model.config.begin_ends[1:], start=1):
        bumped = x.clone()
        bumped[:, begin - first_l:end - first_l] += 1.0
        out = model(labels, bumped, drop_labels=False)
        assert torch.equal(out[:, :begin], ref[:, :begin]), f"scale {k} leaked into earlier scales"
        assert (out[:, begin:end] - ref[:, begin:end]).abs().amax(-1).min() > 0, "every position of the scale sees it"
    # within a scale attention is bidirectional: the last token of a scale changes the first one's logits
    begin, end = model.config.begin_ends[2]
    bumped = x.clone()
    bumped[:, end - 1 - first_l] += 1.0
    out = model(labels, bumped, drop_labels=False)
    assert not torch.allclose(out[:, begin], ref[:, begin])


@pytest.mark.parametrize("shared_aln", [False, True])
def test_gradients_reach_every_parameter(shared_aln):
    model = tiny(shared_aln=shared_aln).train()
    loss, logits = model.loss_on_tokens(torch.tensor([0, 5, 9]), tokens_for(model), drop_labels=False)
    assert logits.shape == (3, model.config.seq_len, 16) and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_shared_aln_variant_keys_and_forward():
    model = tiny(shared_aln=True)
    keys = list(model.state_dict())
    assert "shared_ada_lin.1.weight" in keys and "blocks.0.ada_gss" in keys
    assert not any(".ada_lin." in k and k.startswith("blocks.") for k in keys)
    assert keys.index("blocks.0.ada_gss") < keys.index("blocks.0.attn.scale_mul_1H11")
    plain = tiny()
    assert "shared_ada_lin.1.weight" not in plain.state_dict() and "blocks.0.ada_lin.1.weight" in plain.state_dict()
    x = model.teacher_forcing_input(tokens_for(model, 2))
    assert torch.isfinite(model(torch.tensor([1, 2]), x, drop_labels=False)).all()
    # the shared modulation is the shared Linear's output plus each block's offset
    cond = model.class_emb(torch.tensor([4]))
    _, mods, _ = model.conditions(torch.tensor([4]))
    shared = model.shared_ada_lin(cond).view(1, 1, 6, 32)
    assert torch.allclose(mods[1], shared + model.blocks[1].ada_gss)


def test_label_dropout_follows_the_official_rule_in_eval_mode_too():
    model = tiny(class_dropout=0.5)
    labels = torch.arange(8) % 10
    x = model.teacher_forcing_input(tokens_for(model, 8))
    torch.manual_seed(123)
    drop = torch.rand(8) < 0.5
    assert 0 < int(drop.sum()) < 8
    torch.manual_seed(123)
    out = model(labels, x)  # eval mode, as the official forward
    expected = model.prefix_logits(torch.where(drop, 10, labels), x)
    assert torch.equal(out, expected)
    state = torch.get_rng_state()
    assert torch.equal(model(labels, x, drop_labels=False), model.prefix_logits(labels, x))
    assert torch.equal(torch.get_rng_state(), state), "no dropout draw when it is off"
    model.config.class_dropout = 0.0
    assert torch.equal(model(labels, x), model.prefix_logits(labels, x))


def test_attention_multiplier_is_clamped_at_log_100_and_softmax_scale_is_one():
    model = tiny()
    labels, x = torch.tensor([1, 2]), model.teacher_forcing_input(tokens_for(model, 2))
    with torch.no_grad():
        model.blocks[0].attn.scale_mul_1H11.fill_(math.log(100) + 0.7)
    a = model(labels, x, drop_labels=False)
    with torch.no_grad():
        model.blocks[0].attn.scale_mul_1H11.fill_(50.0)
    assert torch.equal(a, model(labels, x, drop_labels=False))
    attn = model.blocks[1].attn
    h = torch.randn(2, 5, 32)
    q, k, v = F.linear(h, attn.mat_qkv.weight, torch.cat([attn.q_bias, attn.zero_k_bias, attn.v_bias])
                       ).view(2, 5, 3, 2, 16).permute(2, 0, 3, 1, 4)
    q = F.normalize(q, dim=-1) * attn.scale_mul_1H11.clamp_max(math.log(100)).exp()
    w = (q @ F.normalize(k, dim=-1).transpose(-1, -2)).softmax(-1)  # no 1/sqrt(head_dim)
    manual = attn.proj((w @ v).transpose(1, 2).reshape(2, 5, 32))
    assert torch.allclose(attn(h, None), manual, atol=1e-5)


def test_layernorm_eps_chunk_order_and_tanh_gelu():
    model = tiny()
    block = model.blocks[0]
    assert block.eps == 1e-6 and model.head_nm.eps == 1e-6 and block.ffn.act.approximate == "tanh"
    x = 1.0 + 1e-3 * torch.randn(1, 4, 32)  # variance ~1e-6: eps 1e-5 would differ visibly
    manual = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    assert torch.allclose(block._ln(x), manual, atol=1e-4)
    assert not torch.allclose(F.layer_norm(x, (32,), eps=1e-5), manual, atol=1e-2)
    # chunks (gamma1, gamma2, scale1, scale2, shift1, shift2): zero gammas make the block the identity
    mod = torch.randn(1, 1, 6, 32)
    mod[:, :, :2] = 0
    assert torch.equal(block(x, mod, None), x)


def test_ffn_in_place_gelu_at_inference_equals_the_training_path():
    ffn = tiny().blocks[0].ffn
    x = torch.randn(2, 7, 32) * 3
    trained = ffn(x)  # parameters require grad: the module's GELU
    assert trained.requires_grad
    with torch.no_grad():
        fast = ffn(x)  # in place on the fc1 output
    assert torch.equal(fast, trained.detach())
    want = ffn.fc2(F.gelu(ffn.fc1(x), approximate="tanh"))
    assert torch.equal(trained, want)


@pytest.mark.parametrize("shared_aln", [False, True])
def test_cached_decoder_equals_full_recompute_and_teacher_forcing(shared_aln):
    model = tiny(shared_aln=shared_aln)
    tokens = tokens_for(model, 2)
    per_scale = model.quantizer.split_scales(tokens)
    cond_ids = torch.tensor([3, 7, 10, 10])  # two conditional rows and their null rows
    rows = torch.cat([tokens, tokens])
    teacher = model.prefix_logits(cond_ids, model.teacher_forcing_input(rows))
    cached, full = VARCachedDecoder(model), VARFullRecompute(model)
    with torch.no_grad():
        outs = [(cached.start(cond_ids), full.start(cond_ids))]
        for k in range(1, len(PATCH)):
            fed = torch.cat([per_scale[k - 1], per_scale[k - 1]])
            outs.append((cached.step(fed, k), full.step(fed, k)))
    for k, ((c, f), (begin, end)) in enumerate(zip(outs, model.config.begin_ends)):
        assert c.shape == (4, end - begin, 16)
        torch.testing.assert_close(c, f, atol=1e-5, rtol=1e-5, msg=f"scale {k}")
        torch.testing.assert_close(c, teacher[:, begin:end], atol=1e-5, rtol=1e-5, msg=f"scale {k}")
    # the decoder's f_hat after the last step holds every scale but the last
    torch.testing.assert_close(cached.f_hat[:2], model.quantizer.decode_scales(per_scale[:-1]), atol=1e-6, rtol=0)
    # the cache is reused for a second batch of the same size and gives the same numbers
    cache = cached.cache
    with torch.no_grad():
        again = cached.start(cond_ids)
    assert cached.cache is cache and torch.equal(again, outs[0][0])


def test_cached_decoder_under_bf16_autocast_caches_keys_in_bf16():
    # keys and values are stored in the dtype attention computes in, so no step re-casts the cached prefix;
    # a decoder reused at another precision makes a new cache
    model = tiny()
    tokens = tokens_for(model, 2)
    per_scale = model.quantizer.split_scales(tokens)
    cond_ids = torch.tensor([3, 7, 10, 10])
    decoder = VARCachedDecoder(model)
    with torch.no_grad():
        decoder.start(cond_ids)
        assert decoder.cache.k[0].dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = [decoder.start(cond_ids)]
            outs += [decoder.step(torch.cat([per_scale[k - 1]] * 2), k) for k in range(1, len(PATCH))]
            teacher = model.prefix_logits(cond_ids, model.teacher_forcing_input(torch.cat([tokens, tokens])))
        assert decoder.cache.k[0].dtype == decoder.cache.v[-1].dtype == torch.bfloat16
        fp32 = model.prefix_logits(cond_ids, model.teacher_forcing_input(torch.cat([tokens, tokens])))
    got = torch.cat(outs, dim=1)
    assert fp32.abs().max() > 4  # logits of a few units: a bf16 head rounds them to 1/32 .. 1/16
    torch.testing.assert_close(got, teacher, atol=0.07, rtol=0)  # one bf16 step apart at most
    torch.testing.assert_close(got, fp32, atol=0.15, rtol=0)


def test_cached_decoder_guides_before_the_head_as_the_loop_guides_the_logits():
    # with a HeadMix the decoder takes the B drawn token rows and returns the guided logits of B rows: the
    # head over uncond + (cond - uncond) * s of its input equals the same mix of the 2B rows' logits
    from vqtok.ar.sampling import HeadMix, guide

    model = tiny()
    per_scale = model.quantizer.split_scales(tokens_for(model, 2))
    cond_ids = torch.tensor([3, 7, 10, 10])
    plain, mixed, cond_only = VARCachedDecoder(model), VARCachedDecoder(model), VARCachedDecoder(model)
    assert VARCachedDecoder.guides_before_head
    with torch.no_grad():
        for k in range(len(PATCH)):
            scale = 1.5 + k
            if k == 0:
                ref, got, c = plain.start(cond_ids), mixed.start(cond_ids, mix=HeadMix(scale)), cond_only.start(
                    cond_ids, mix=HeadMix(None))
            else:
                fed = per_scale[k - 1]
                ref = plain.step(torch.cat([fed, fed]), k)
                got, c = mixed.step(fed, k, mix=HeadMix(scale)), cond_only.step(fed, k, mix=HeadMix(None))
            assert got.shape == (2, PATCH[k] ** 2, 16)
            torch.testing.assert_close(got, guide(ref, scale), atol=1e-5, rtol=1e-5, msg=f"scale {k}")
            torch.testing.assert_close(c, ref[:2], atol=1e-6, rtol=1e-6, msg=f"scale {k}")
    torch.testing.assert_close(mixed.f_hat, plain.f_hat[:2], atol=1e-6, rtol=0)  # f_hat kept for the B rows only
    with pytest.raises(ValueError, match="token rows"):
        mixed.step(torch.cat([per_scale[0], per_scale[0]]), 1, mix=HeadMix(2.0))


def test_loss_is_per_token_cross_entropy_over_L_averaged_over_batch():
    logits, targets = torch.randn(3, 14, 16), torch.randint(0, 16, (3, 14))
    ce = F.cross_entropy(logits.reshape(-1, 16), targets.reshape(-1), reduction="none").view(3, 14)
    assert torch.allclose(var_loss(logits, targets), ce.mean(), atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(1)
    a = tiny().train()
    b = tiny().train()
    b.load_state_dict(a.state_dict())
    b.bind_quantizer(a.quantizer)
    b.config.grad_checkpointing = True
    labels, tokens = torch.tensor([1, 2]), tokens_for(a, 2)
    for m in (a, b):
        m.loss_on_tokens(labels, tokens, drop_labels=False)[0].backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_init_weights_is_the_release_initialisation():
    model = VAR(VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=10, vocab_size=16, codebook_dim=4,
                          patch_nums=list(PATCH)))
    model.init_weights()
    std = math.sqrt(1 / 64 / 3)
    gates = model.blocks[0].ada_lin[1].weight.detach()[:128]
    assert float(gates.abs().max()) < 1e-4 * 3 * std and float(model.blocks[0].ada_lin[1].bias.detach().abs().sum()) == 0
    assert float(model.head.weight.detach().std()) == pytest.approx(0.02 * std, rel=0.2)
    assert float(model.blocks[1].attn.proj.weight.detach().std()) == pytest.approx(std / 2, rel=0.2)


def test_bad_input_is_one_user_error():
    model = tiny()
    with pytest.raises(UserError, match="scale boundary"):
        model(torch.tensor([1]), torch.zeros(1, 3, 4))
    with pytest.raises(UserError, match="class ids"):
        model.condition_ids(torch.tensor([10]))
    with pytest.raises(UserError, match="multi-scale tokens"):
        model.loss_on_tokens(torch.tensor([1]), torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(UserError, match="no tokenizer bound"):
        VAR(model.config).quantizer
    with pytest.raises(UserError, match="single-scale"):
        model.bind_quantizer(VectorQuantizer(codebook_size=16, dim=4))
    with pytest.raises(UserError, match="codes"):
        model.bind_quantizer(tiny_quantizer(V=32))


# ------------------------------------------------------------------------------- official weights


def official_state(model: VAR) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_conversion_round_trips_and_detects_the_architecture():
    for shared in (False, True):
        model = tiny(shared_aln=shared)
        cfg = var_gpt.to_config(official_state(model), model.quantizer)
        state = var_gpt.convert(official_state(model), model.quantizer)
        assert list(state) == list(model.state_dict())
        assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.shared_aln, cfg.patch_nums) == (2, 32, 2, shared, list(PATCH))
        loaded = var_gpt.load(official_state(model), model.quantizer)
        x = model.teacher_forcing_input(tokens_for(model, 2))
        assert torch.equal(loaded(torch.tensor([1, 2]), x, drop_labels=False), model(torch.tensor([1, 2]), x, drop_labels=False))


def test_conversion_refuses_missing_or_mismatched_tokenizers():
    model = tiny()
    sd = official_state(model)
    assert var_gpt.matches(sd)
    with pytest.raises(UserError, match="needs its multi-scale tokenizer"):
        var_gpt.convert(sd)
    with pytest.raises(UserError, match="single-scale"):
        var_gpt.convert(sd, VectorQuantizer(codebook_size=16, dim=4))
    with pytest.raises(UserError, match="predicts 16 codes but the tokenizer has 32"):
        var_gpt.convert(sd, tiny_quantizer(V=32))
    with pytest.raises(UserError, match="4-channel codes but the tokenizer's have 8"):
        var_gpt.convert(sd, tiny_quantizer(dim=8))
    with pytest.raises(UserError, match=r"scales \[1, 2, 3\] but the tokenizer has \[1, 2, 3, 4\]"):
        var_gpt.convert(sd, tiny_quantizer(patch_nums=(1, 2, 3, 4)))
    broken = dict(sd)
    broken.pop("blocks.1.ffn.fc2.bias")
    with pytest.raises(UserError, match="lacks 1 tensor"):
        var_gpt.convert(broken, model.quantizer)
    broken = dict(sd, **{"blocks.0.extra": torch.zeros(1)})
    with pytest.raises(UserError, match="no place"):
        var_gpt.convert(broken, model.quantizer)


def test_tokenizer_config_is_accepted_and_checked():
    from vqtok.tokenizer.config import QuantizerConfig, TokenizerConfig

    model = tiny()
    cfg = TokenizerConfig(quantizer=QuantizerConfig(kind="msvq", params={"codebook_size": 16, "dim": 4, "patch_nums": [1, 2, 3]}))
    assert var_gpt.to_config(official_state(model), cfg).patch_nums == [1, 2, 3]
    with pytest.raises(UserError, match="single-scale"):
        var_gpt.to_config(official_state(model), TokenizerConfig(quantizer=QuantizerConfig(kind="vq")))


# ------------------------------------------------------------------------------- fixtures


def _generator_jsons(fixtures_dir, pattern: str):
    paths = sorted((fixtures_dir / "generators").glob(pattern))
    if not paths and __import__("os").environ.get("VQTOK_REQUIRE_FIXTURES") == "1":
        pytest.fail(f"no generators/{pattern} under {fixtures_dir}")
    if not paths:
        pytest.skip(f"no generators/{pattern} under {fixtures_dir}")
    return paths


def test_full_size_key_listings_map_exactly(fixtures_dir):
    from conformance_var_gpt import check_keys

    listings = _generator_jsons(fixtures_dir, "keys/var_d*.json")
    seen = {}
    for path in listings:
        seen[path.stem] = check_keys(path)
    assert {"var_d16", "var_d20", "var_d24", "var_d30"} <= set(seen), sorted(seen)
    assert seen["var_d30"]["num_parameters"] == 2010020356 and seen["var_d16"]["entries"] == 220


def test_var_gpt_fixture(fixtures_dir):
    from conformance_var_gpt import check

    for path in _generator_jsons(fixtures_dir, "var_gpt*.json"):
        report = check(path)
        assert report["forward/logits"] < 5e-5
        assert any(k.endswith("sample_seeded/idx_Bl[3]") for k in report)


# ------------------------------------------------------------------------------- the sampling loop


def test_sampling_loop_runs_scale_by_scale_with_the_ramp():
    from vqtok.ar.sampling import SamplingConfig, guidance_schedule, sample

    model = tiny()
    assert model.generation_steps() == [1, 4, 9] and model.generation_order(None) is None
    sc = SamplingConfig(guidance_scale=2.5, guidance_schedule="ramp", top_k=5, top_p=0.9)
    assert guidance_schedule(sc, 3).tolist() == [1.0, 1.75, 2.5]  # VAR's cfg 1.5: 1 + 1.5 * k / (K - 1)
    labels = torch.tensor([1, 4])
    a = sample(model, labels, sc, generator=torch.Generator().manual_seed(5))
    b = sample(model, labels, sc, generator=torch.Generator().manual_seed(5), kv_cache=False)
    assert a.tokens.shape == (2, 14) and torch.equal(a.tokens, b.tokens)
    # teacher forcing exposes the exact distributions: the guided, filtered softmax of the forward's logits
    forced = sample(model, labels, sc, forced_tokens=a.tokens, return_probs=True)
    assert torch.equal(forced.tokens, a.tokens)
    rows = torch.cat([a.tokens, a.tokens])
    logits = model.prefix_logits(torch.tensor([1, 4, 10, 10]), model.teacher_forcing_input(rows))
    from vqtok.ar.sampling import guide, token_probs

    for k, (begin, end) in enumerate(model.config.begin_ends):
        want = token_probs(guide(logits[:, begin:end], guidance_schedule(sc, 3)[k]), sc)
        torch.testing.assert_close(forced.probs[:, begin:end], want, atol=1e-5, rtol=1e-5)
        assert bool(((want > 0).sum(-1) <= 5).all()), "top-k keeps at most k codes"
    # without guidance the loop runs the conditional rows only; temperature 0 is the argmax
    greedy = sample(model, labels, SamplingConfig(guidance_scale=0, temperature=0))
    plain = model.prefix_logits(labels, model.teacher_forcing_input(greedy.tokens))
    assert torch.equal(plain.argmax(-1), greedy.tokens)
    with pytest.raises(UserError, match="scale by scale"):
        sample(model, labels, SamplingConfig(order="row-major"))


def test_generator_checkpoint_round_trip(tmp_path):
    from vqtok.ar.checkpoint import load_generator, save_generator
    from vqtok.ar.families import family_of, get_family

    model = tiny(shared_aln=True)
    assert family_of(model).name == "var" and get_family("var").multiscale_tokens
    save_generator(tmp_path / "g", model, model.config, {"vocab_size": 16})
    loaded, identity = load_generator(tmp_path / "g")
    assert identity["family"] == "var" and identity["seq_len"] == 14 and identity["patch_nums"] == [1, 2, 3]
    assert isinstance(loaded, VAR) and loaded.config == model.config
    loaded.bind_quantizer(model.quantizer)
    x = model.teacher_forcing_input(tokens_for(model, 2))
    assert torch.equal(loaded(torch.tensor([0, 1]), x, drop_labels=False), model(torch.tensor([0, 1]), x, drop_labels=False))


def test_presets_follow_the_release_rule():
    from vqtok.ar.var import PRESETS, preset_for

    assert preset_for(VARConfig.from_depth(24)) == "var-d24" and preset_for(tiny().config) is None
    cfg = PRESETS["var-d30"]()
    assert (cfg.embed_dim, cfg.num_heads, cfg.seq_len) == (1920, 30, 680)


def test_paper_sampling_preset_is_the_release_fid_setting():
    from vqtok.ar.presets import paper_sampling
    from vqtok.ar.sampling import guidance_schedule

    sc = paper_sampling("var-d16")
    assert (sc.guidance_schedule, sc.top_k, sc.top_p, sc.temperature) == ("ramp", 900, 0.96, 1.0)
    ramp = guidance_schedule(sc, 10)
    assert ramp[0] == 1.0 and float(ramp[-1]) == pytest.approx(2.5)  # official t = 1.5 * k / 9: 1 + t


def test_training_hooks_take_multiscale_shards_only():
    from vqtok.ar.var import token_fields, train_loss

    assert token_fields(16, [[1, 1], [2, 2], [3, 3]], 14) == {"vocab_size": 16, "patch_nums": [1, 2, 3]}
    with pytest.raises(UserError, match="one token grid"):
        token_fields(1024, [[16, 16]], 256)
    with pytest.raises(UserError, match="square"):
        token_fields(16, [[1, 1], [2, 3]], 7)
    model = tiny(class_dropout=0.5).train()
    tokens, cond = tokens_for(model, 4), torch.tensor([1, 10, 3, 10])
    state = torch.get_rng_state()
    loss, acc = train_loss(model, tokens, cond, None)
    assert torch.equal(torch.get_rng_state(), state), "the trainer's class dropout is not drawn again"
    ref = var_loss(model.prefix_logits(cond, model.teacher_forcing_input(tokens)), tokens)
    torch.testing.assert_close(loss, ref)
    assert 0.0 <= float(acc) <= 1.0


# ------------------------------------------------------------------------------- vqtok convert


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def _saved_tokenizers(tmp_path):
    """A tiny multi-scale tokenizer saved as tmp_path/msvq and a single-scale one as tmp_path/vqgan; returns the
    multi-scale one and a small VARConfig on its codebook and scales."""
    from vqtok.tokenizer.tokenizer import build_tokenizer

    msvq, single = build_tokenizer("tiny-msvq").eval(), build_tokenizer("tiny-vqgan").eval()
    msvq.save(tmp_path / "msvq")
    single.save(tmp_path / "vqgan")
    q = msvq.quantize
    return msvq, VARConfig(depth=1, embed_dim=32, num_heads=2, num_classes=10, vocab_size=q.codebook_size,
                           codebook_dim=q.dim, patch_nums=[h for h, _ in q.scales])


def test_convert_cli_needs_the_multiscale_tokenizer(tmp_path):
    from typer.testing import CliRunner

    from vqtok.ar.checkpoint import load_generator
    from vqtok.cli import app

    msvq, cfg = _saved_tokenizers(tmp_path)
    q = msvq.quantize
    official = VAR(cfg)
    torch.save(official.state_dict(), tmp_path / "var_d1.pth")
    runner = CliRunner()
    base = ["convert", str(tmp_path / "var_d1.pth"), "--out", str(tmp_path / "gen")]
    assert "--tokenizer" in _one_error_line(runner.invoke(app, base))
    assert "single-scale" in _one_error_line(runner.invoke(app, base + ["--tokenizer", str(tmp_path / "vqgan")]))
    assert "--heads applies to LlamaGen generators only" in _one_error_line(
        runner.invoke(app, base + ["--tokenizer", str(tmp_path / "msvq"), "--heads", "2"]))
    assert not (tmp_path / "gen").exists(), "nothing written on a refused conversion"
    other = VAR(VARConfig(depth=1, embed_dim=32, num_heads=2, num_classes=10, vocab_size=64, codebook_dim=q.dim,
                          patch_nums=cfg.patch_nums))
    torch.save(other.state_dict(), tmp_path / "other.pth")
    line = _one_error_line(runner.invoke(app, ["convert", str(tmp_path / "other.pth"), "--out", str(tmp_path / "gen"),
                                               "--tokenizer", str(tmp_path / "msvq")]))
    assert f"predicts 64 codes but the tokenizer has {q.codebook_size}" in line

    result = runner.invoke(app, base + ["--tokenizer", str(tmp_path / "msvq")])
    assert result.exit_code == 0, result.output
    model, identity = load_generator(tmp_path / "gen")
    assert isinstance(model, VAR) and identity["family"] == "var"
    assert identity["tokenizer"]["hash"] == msvq.identity()["hash"]
    for key, value in official.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_sample_cli_runs_a_var_generator_and_refuses_a_single_scale_tokenizer(tmp_path):
    import json

    import numpy as np
    from typer.testing import CliRunner

    from vqtok.interop.var_gpt import save_converted
    from vqtok.cli import app

    torch.manual_seed(0)
    msvq, cfg = _saved_tokenizers(tmp_path)
    q = msvq.quantize
    save_converted(VAR(cfg).state_dict(), tmp_path / "gen", tokenizer=tmp_path / "msvq")
    runner = CliRunner()
    base = ["sample", "--ckpt", str(tmp_path / "gen"), "--classes", "1,7,3", "--device", "cpu",
            "--cfg", "2.5", "--cfg-schedule", "ramp", "--top-k", "9", "--top-p", "0.96"]
    # tokens only still needs the tokenizer: VAR builds every scale's input from its codebook and Phi
    result = runner.invoke(app, base + ["--tokens-only", "--out", str(tmp_path / "tok")])
    assert result.exit_code == 0, result.output
    assert "guidance ramp" in result.output
    tokens = np.load(tmp_path / "tok" / "tokens.npy")
    assert tokens.shape == (3, msvq.tokens_per_image) and tokens.max() < q.codebook_size
    settings = json.loads((tmp_path / "tok" / "sample.json").read_text())["sampling"]
    assert settings["top_k"] == 9 and settings["top_p"] == 0.96 and settings["guidance_schedule"] == "ramp"
    result = runner.invoke(app, base + ["--out", str(tmp_path / "img"), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "img" / "grid.png").is_file()
    assert np.array_equal(np.load(tmp_path / "img" / "labels.npy"), [1, 7, 3])
    line = _one_error_line(runner.invoke(app, base + ["--tokenizer", str(tmp_path / "vqgan"), "--out", str(tmp_path / "bad")]))
    assert "codes" in line or "single-scale" in line or "tokens" in line, line
    assert not (tmp_path / "bad").exists()
    line = _one_error_line(runner.invoke(app, base + ["--cuda-graphs", "on", "--out", str(tmp_path / "bad")]))
    assert "CUDA" in line


def test_paper_preset_keeps_its_filters_unless_a_flag_replaces_them():
    from vqtok.app.sample import sampling_config

    paper = sampling_config("var-d16")
    assert (paper.guidance_scale, paper.guidance_schedule, paper.top_k, paper.top_p) == (2.5, "ramp", 900, 0.96)
    assert sampling_config("var-d16", top_k=0).top_k == 0 and sampling_config("var-d16", top_p=1.0).top_p == 1.0
    plain = sampling_config(None)
    assert (plain.top_k, plain.top_p) == (0, 1.0)


# ------------------------------------------------------------------------------ train-ar recipes


@pytest.mark.parametrize("depth,batch,epochs,lr,alng,end", [
    (16, 768, 200, 3e-4, 1e-3, 0.1), (20, 768, 250, 3e-4, 1e-3, 0.1),
    (24, 768, 350, 2.4e-4, 1e-4, 0.01), (30, 1024, 350, 3.2e-4, 1e-5, 0.01)])
def test_var_recipes_are_the_release_training_commands(depth, batch, epochs, lr, alng, end):
    # the VAR README's train.py commands on utils/arg_util.py: lr = tblr * bs / 256, warm-up ep / 50
    from vqtok.train.ar_task import load_run_config

    cfg = load_run_config(f"var-d{depth}", [])
    m, o = cfg.model, cfg.optim
    assert cfg.arch == "var" and isinstance(m, VARConfig)
    assert (m.depth, m.embed_dim, m.num_heads) == (depth, 64 * depth, depth)
    assert m.drop_path_rate == pytest.approx(0.1 * depth / 24) and m.class_dropout == 0.1 and m.init_adaln_gamma == alng
    assert (o.kind, tuple(o.betas), o.weight_decay, o.grad_clip) == ("adamw", (0.9, 0.95), 0.05, 2.0)
    assert o.lr == pytest.approx(lr) and o.schedule.kind == "linear"
    assert o.schedule.end_lr == pytest.approx(lr * end) and o.schedule.warmup == pytest.approx(epochs / 50)
    assert cfg.epochs == epochs and cfg.train.batch_size == batch and cfg.train.amp


def test_var_tiny_trains_on_multiscale_tokens_and_samples_through_the_cli(tmp_path):
    import json

    import numpy as np
    from typer.testing import CliRunner

    from test_train_ar import BASE, make_token_dir

    from vqtok.ar.checkpoint import load_generator
    from vqtok.cli import app
    from vqtok.tokenizer.tokenizer import build_tokenizer
    from vqtok.train.ar_task import train_ar

    torch.manual_seed(0)
    tok = build_tokenizer("tiny-msvq")
    tok.save(tmp_path / "tok")
    L = tok.tokens_per_image
    data = np.random.default_rng(0).integers(0, tok.vocab_size, (12, 2, L))
    tokens = make_token_dir(tmp_path / "wds", tok.identity(), data, [i % 3 for i in range(12)])
    result = train_ar(tokens, tmp_path / "tok", tmp_path / "run", config="var-tiny",
                      overrides=BASE + ["train.steps=4"], device="cpu")
    assert result.step == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)
    model, identity = load_generator(tmp_path / "run" / "final")
    assert isinstance(model, VAR) and identity["family"] == "var"
    assert model.config.patch_nums == [h for h, _ in tok.scales] and model.config.vocab_size == tok.vocab_size
    out = tmp_path / "samples"
    res = CliRunner().invoke(app, ["sample", "--ckpt", str(tmp_path / "run" / "final"), "--classes", "0,2",
                                   "--device", "cpu", "--out", str(out), "--cfg", "2.0", "--cfg-schedule", "ramp"])
    assert res.exit_code == 0, res.output
    assert (out / "grid.png").is_file() and np.array_equal(np.load(out / "labels.npy"), [0, 2])
    # a raster family refuses these multi-scale shards in one line
    with pytest.raises(UserError, match="multi-scale"):
        train_ar(tokens, tmp_path / "tok", tmp_path / "run2", config="rar-tiny", overrides=BASE + ["train.steps=1"],
                 device="cpu")
