"""LlamaGen c2i GPT: official key listings, RoPE, causality, cached decoding, gradients, label dropout,
checkpoint unwrapping."""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conformance_llamagen_gpt import check, check_keys
from vqtok.ar import llamagen
from vqtok.ar.llamagen import LlamaGen, LlamaGenConfig, apply_rope, rope_table, size_config
from vqtok.ar.sampling import GeneratorDraw, HeadMix, InverseCDFDraw, SamplingConfig, sample
from vqtok.errors import ConfigError, UserError
from vqtok.interop import llamagen_gpt as interop

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: extra threads only add contention

REPO = Path(__file__).resolve().parent.parent
GENERATORS = Path(os.environ.get("VQTOK_FIXTURES", REPO.parent / "shared" / "fixtures")) / "generators"
KEY_LISTINGS = sorted(glob.glob(str(GENERATORS / "keys" / "llamagen_gpt_*.json")))
FIXTURE_JSONS = [p for p in sorted(GENERATORS.glob("*.json")) if '"llamagen_gpt"' in p.read_text()[:4000]] if GENERATORS.is_dir() else []
REQUIRED = os.environ.get("VQTOK_REQUIRE_FIXTURES") == "1"


@pytest.mark.parametrize("json_path", FIXTURE_JSONS, ids=lambda p: p.stem)
def test_llamagen_gpt_fixture(json_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    got = check(json_path)
    # every group the JSON describes was compared: forward, label dropout, and each sampling file's codes
    assert got["forward_train.logits"] < 1e-4 and "label_drop.drop_mask" in got
    assert sum(k.endswith(".returned_reseeded") for k in got) == sum(k.endswith(".returned_noise_replay") for k in got) >= 1


def test_fixtures_present_when_required():
    if REQUIRED:
        assert FIXTURE_JSONS and len(KEY_LISTINGS) == 5


def tiny(**kw) -> LlamaGenConfig:
    base = dict(dim=32, n_layer=2, n_head=4, vocab_size=40, block_size=16, num_classes=10, multiple_of=16,
                token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    base.update(kw)
    return LlamaGenConfig(**base)


def random_model(cfg: LlamaGenConfig, seed: int = 0) -> LlamaGen:
    torch.manual_seed(seed)
    model = LlamaGen(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) / math.sqrt(p.shape[-1]))
    return model.eval()


@pytest.mark.parametrize("path", KEY_LISTINGS, ids=lambda p: Path(p).stem)
def test_full_size_key_listings_map_exactly(path):
    if not KEY_LISTINGS:
        pytest.skip("no key listings")
    got = check_keys(path)
    assert got["entries"] > 0


def test_official_sizes():
    counts = {"B": 110_888_448, "L": 342_910_976, "XL": 774_699_520, "XXL": 1_410_972_672, "3B": 3_096_659_200}
    for size, want in counts.items():
        with torch.device("meta"):
            model = LlamaGen(size_config(size))
        assert model.num_parameters() == want, size
    assert size_config("3B").ffn_hidden == 8704 and size_config("B").ffn_hidden == 2048
    assert size_config("GPT-L", block_size=576).grid_size == 24


def test_rope_matches_a_hand_computed_rotation():
    cfg = tiny(dim=32, n_head=2, block_size=16)  # head_dim 16: 4 frequencies per axis, grid 4x4
    table = rope_table(cfg)
    assert table.shape == (17, 8, 2)
    assert torch.equal(table[0], torch.zeros(8, 2))  # the class slot: cos = sin = 0
    torch.manual_seed(0)
    x = torch.randn(1, 17, 1, 16)
    out = apply_rope(x, table)
    assert torch.equal(out[0, 0], torch.zeros(1, 16))  # the class token's q / k become zero
    t = 9  # token 9 = grid row 2, column 1, in sequence slot 10
    row, col = divmod(t, 4)
    want = torch.empty(16)
    for i in range(8):
        j, pos = (i, row) if i < 4 else (i - 4, col)
        angle = pos * 10000.0 ** (-2 * j / 8)
        a, b = x[0, 1 + t, 0, 2 * i].item(), x[0, 1 + t, 0, 2 * i + 1].item()
        want[2 * i] = a * math.cos(angle) - b * math.sin(angle)
        want[2 * i + 1] = b * math.cos(angle) + a * math.sin(angle)
    torch.testing.assert_close(out[0, 1 + t, 0], want, atol=1e-6, rtol=1e-6)


def test_rope_table_stays_float32_under_a_dtype_cast():
    model = LlamaGen(tiny()).to(torch.bfloat16)
    assert model.rope.dtype == torch.float32
    torch.testing.assert_close(model.rope, rope_table(model.config), atol=0, rtol=0)
    assert "rope" not in model.state_dict()


def test_causal_and_slot_layout():
    model = random_model(tiny())
    torch.manual_seed(1)
    tokens = torch.randint(0, 40, (2, 16))
    classes = torch.tensor([3, 7])
    with torch.no_grad():
        base = model(tokens, classes)
        assert base.shape == (2, 16, 40)
        j = 6
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 1) % 40
        other = model(changed, classes)
    # slot k sees tokens < k: changing token j leaves slots 0..j unchanged and changes slot j+1
    torch.testing.assert_close(other[:, : j + 1], base[:, : j + 1], atol=0, rtol=0)
    assert (other[:, j + 1] - base[:, j + 1]).abs().max() > 1e-4
    # the last token is never an input
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 40
    with torch.no_grad():
        torch.testing.assert_close(model(changed, classes), base, atol=0, rtol=0)


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_decoders_match_the_full_forward(kv_heads):
    model = random_model(tiny(n_kv_head=kv_heads))
    torch.manual_seed(2)
    tokens = torch.randint(0, 40, (3, 16))
    cond = torch.tensor([1, 2, model.config.null_class_id])
    with torch.no_grad():
        ref = model.prefix_logits(tokens[:, :-1], cond)  # (3, 16, V)
        for decoder in (llamagen.CachedDecoder(model), llamagen.StaticDecoder(model, 3, guided=False), llamagen.FullRecompute(model)):
            for _ in range(2):  # a second batch reuses the buffers
                steps = [decoder.start(cond).clone()]
                for step in range(1, 16):
                    steps.append(decoder.step(tokens[:, step - 1:step], step).clone())
                got = torch.cat(steps, dim=1)
                torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5, msg=lambda m: f"{type(decoder).__name__}: {m}")


def test_static_decoder_keeps_its_addresses():
    model = random_model(tiny())
    decoder = llamagen.StaticDecoder(model, 1, guided=True)
    ptrs = (decoder.logits.data_ptr(), decoder.token.data_ptr(), decoder.cond_ids.data_ptr(), decoder.cache.k[0].data_ptr())
    mix_ptrs = (decoder.mix.scale.data_ptr(), decoder.mix.guided.data_ptr())
    with torch.no_grad():
        out = decoder.start(torch.tensor([0, 10]), mix=HeadMix(2.0))
        out2 = decoder.step(torch.tensor([[3]]), 1, mix=HeadMix(None))
    assert out.data_ptr() == out2.data_ptr() == ptrs[0] and out2.shape == (1, 1, 40)
    assert (decoder.logits.data_ptr(), decoder.token.data_ptr(), decoder.cond_ids.data_ptr(), decoder.cache.k[0].data_ptr()) == ptrs
    assert (decoder.mix.scale.data_ptr(), decoder.mix.guided.data_ptr()) == mix_ptrs
    assert decoder.token.flatten().tolist() == [3, 3]  # the drawn token feeds its conditional and its null row
    with pytest.raises(ValueError, match="2 rows"):
        decoder.start(torch.tensor([0, 1, 2]), mix=HeadMix(2.0))
    with pytest.raises(ValueError, match="built with CFG, got no guidance mix"):
        decoder.step(torch.tensor([[3]]), 2)
    with pytest.raises(ValueError, match="2 tokens for a static decoder of batch 1"):
        decoder.step(torch.tensor([[3], [4]]), 2, mix=HeadMix(2.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_decoder_guides_before_the_head_as_the_cached_decoder(dtype):
    # both mix [conditional; null] rows before the head, the static one with its scale in a buffer: the same
    # logits bitwise, guided steps and the steps past the guidance interval (conditional rows alone) alike
    model = random_model(tiny()).to(dtype)
    cond = torch.tensor([1, 2, 3, model.config.null_class_id, model.config.null_class_id, model.config.null_class_id])
    tokens = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(4))
    mixes = [HeadMix(1.0 + 0.37 * s) if s % 4 else HeadMix(None) for s in range(16)]
    cached, static = llamagen.CachedDecoder(model), llamagen.StaticDecoder(model, 3, guided=True)
    with torch.no_grad():
        for _ in range(2):  # a second batch refills the static buffers
            a, b = cached.start(cond, mix=mixes[0]), static.start(cond, mix=mixes[0]).clone()
            assert a.shape == b.shape == (3, 1, 40) and torch.equal(a, b)
            for step in range(1, 16):
                a = cached.step(tokens[:, step - 1], step, mix=mixes[step])
                b = static.step(tokens[:, step - 1], step, mix=mixes[step]).clone()
                assert torch.equal(a, b), step


def test_gradients_reach_every_parameter():
    cfg = tiny(token_dropout_p=0.1, resid_dropout_p=0.1, ffn_dropout_p=0.1, attn_dropout_p=0.1, drop_path_rate=0.1)
    model = random_model(cfg).train()
    torch.manual_seed(3)
    tokens = torch.randint(0, 40, (4, 16))
    loss = llamagen.loss(model(tokens, torch.tensor([0, 1, 2, 3])), tokens)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # a fresh model starts from the official init: zero output layer, uniform first loss
    fresh = LlamaGen(tiny())
    assert torch.count_nonzero(fresh.output.weight) == 0
    with torch.no_grad():
        first = llamagen.loss(fresh.eval()(tokens, torch.tensor([0, 1, 2, 3])), tokens)
    torch.testing.assert_close(first, torch.tensor(math.log(40)))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(4)
    tokens = torch.randint(0, 40, (2, 16))
    grads = []
    for ckpt in (False, True):
        model = random_model(tiny(grad_checkpointing=ckpt)).train()
        llamagen.loss(model(tokens, torch.tensor([1, 2])), tokens).backward()
        grads.append(model.layers[0].attention.wqkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_class_dropout_is_the_official_draw_and_train_only():
    model = random_model(tiny(class_dropout_prob=0.5))
    classes = torch.arange(10)
    torch.manual_seed(5)
    want = torch.where(torch.rand(10) < 0.5, 10, classes)
    torch.manual_seed(5)
    got = model.condition_ids(classes, 0.5)
    assert torch.equal(got, want) and (got == 10).any() and (got != 10).any()
    tokens = torch.randint(0, 40, (10, 16))
    with torch.no_grad():
        model.train()
        torch.manual_seed(5)
        dropped = model(tokens, classes)
        model.eval()
        torch.testing.assert_close(dropped, model.prefix_logits(tokens[:, :-1], want), atol=1e-6, rtol=1e-6)
        torch.manual_seed(5)
        kept = model(tokens, classes)  # eval(): no label dropout
        torch.testing.assert_close(kept, model.prefix_logits(tokens[:, :-1], classes), atol=1e-6, rtol=1e-6)
    with pytest.raises(UserError, match="outside this generator's 10 classes"):
        model.condition_ids(torch.tensor([10]))


def test_rmsnorm_in_float32_with_eps_1e_5():
    model = LlamaGen(tiny())
    assert model.norm.eps == 1e-5 and model.layers[0].attention_norm.eps == 1e-5
    x = torch.randn(2, 3, 32, dtype=torch.float64) * 1e-3  # small values: the eps matters
    with torch.no_grad():
        model.norm.weight.normal_()
        got = model.norm(x)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * model.norm.weight.double()
    torch.testing.assert_close(got, want)


def test_config_errors():
    with pytest.raises(ConfigError, match="cls_token_num"):
        tiny(cls_token_num=2)
    with pytest.raises(ConfigError, match="not a square"):
        tiny(block_size=15)
    with pytest.raises(ConfigError, match="n_kv_head"):
        tiny(n_kv_head=3)
    with pytest.raises(ConfigError, match="unknown LlamaGen size"):
        size_config("M")


def test_tokens_of_the_wrong_length_are_refused():
    model = LlamaGen(tiny())
    with pytest.raises(UserError, match=r"expects \(batch, 16\)"):
        model(torch.zeros(1, 15, dtype=torch.long), torch.tensor([0]))


def _official_like(cfg: LlamaGenConfig) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in random_model(cfg).state_dict().items()}


def test_interop_unwraps_every_release_layout():
    cfg = size_config("B", n_layer=12)
    with torch.device("meta"):
        sd = LlamaGen(cfg).state_dict()
    for wrapped in (sd, {"model": sd, "optimizer": {}, "steps": 1}, {"ema": sd}, {"module": sd},
                    {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
                    {**sd, "freqs_cis": torch.zeros(257, 32, 2), "layers.0.attention.kv_cache.k_cache": torch.zeros(1)}):
        got_cfg, state = interop.load_official(wrapped)
        assert (got_cfg.dim, got_cfg.n_layer, got_cfg.n_head, got_cfg.block_size) == (768, 12, 12, 256)
        assert list(state) == list(sd)
    with pytest.raises(UserError, match="not a LlamaGen GPT checkpoint"):
        interop.convert({"weights": {"a": torch.zeros(1)}})
    with pytest.raises(UserError, match="no state dict under 'ema'"):
        interop.unwrap({"model": sd}, key="ema")
    assert interop.to_config(sd, block_size=576).grid_size == 24
    assert interop.block_size_from_name("/x/c2i_B_384.pt") == 576
    assert interop.block_size_from_name("c2i_3B_384.pt") == 576
    assert interop.block_size_from_name("c2i_L_256.pt") == 256
    assert interop.block_size_from_name("weights.pt") is None


def test_interop_refuses_incomplete_or_foreign_weights():
    cfg = tiny()
    sd = _official_like(cfg)
    got_cfg, state = interop.load_official(sd, block_size=16, n_head=4)
    model = LlamaGen(got_cfg)
    model.load_state_dict(state, strict=True)
    assert list(interop.convert(sd)) == list(state)  # the mapping alone needs no head count
    with pytest.raises(UserError, match="not an official size"):
        interop.load_official(sd)  # dim 32 / 2 layers: the config needs the head count
    broken = dict(sd)
    del broken["layers.1.ffn_norm.weight"]
    with pytest.raises(UserError, match="missing 1 tensor"):
        interop.convert(broken)
    extra = {**sd, "layers.0.attention.extra": torch.zeros(1)}
    with pytest.raises(UserError, match="unexpected tensor"):
        interop.convert(extra)
    wrong = {**sd, "norm.weight": torch.zeros(31)}
    with pytest.raises(UserError, match="norm.weight has shape"):
        interop.convert(wrong)


def test_convert_cli_takes_the_head_count_and_token_count_of_a_custom_size(tmp_path):
    from typer.testing import CliRunner

    from vqtok.ar.checkpoint import load_generator
    from vqtok.cli import app

    model = random_model(tiny())  # dim 32 / 2 layers: not in the official size table
    src = tmp_path / "my_llamagen.pt"
    torch.save({"model": model.state_dict(), "steps": 3}, src)
    runner = CliRunner()
    refused = runner.invoke(app, ["convert", str(src), "--out", str(tmp_path / "gen")])
    assert refused.exit_code == 2 and "--heads N" in refused.output
    assert not (tmp_path / "gen").exists()
    done = runner.invoke(app, ["convert", str(src), "--out", str(tmp_path / "gen"), "--heads", "4", "--tokens", "16"])
    assert done.exit_code == 0, done.output
    loaded, identity = load_generator(tmp_path / "gen")
    assert (loaded.config.n_head, loaded.config.block_size, identity["token_count"]) == (4, 16, "given")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    for heads in ("3", "64"):
        wrong = runner.invoke(app, ["convert", str(src), "--out", str(tmp_path / "g2"), "--heads", heads])
        assert wrong.exit_code == 2 and f"{heads} heads do not divide the width 32" in wrong.output
        assert not (tmp_path / "g2").exists()


def test_vocabulary_mismatch_is_one_line():
    cfg = size_config("B")
    interop.check_vocabulary(cfg, 16384, 256)
    with pytest.raises(UserError, match="predicts 16384 codes but the tokenizer has 1024") as info:
        interop.check_vocabulary(cfg, 1024)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="256 tokens per image but the tokenizer uses 576"):
        interop.check_vocabulary(cfg, 16384, 576)


# ------------------------------------------------------------------------------ the one sampling loop


@pytest.mark.parametrize("cfg", [SamplingConfig(guidance_scale=3.0, top_k=5, top_p=0.9),
                                 SamplingConfig(guidance_scale=0.0, temperature=0.7),
                                 SamplingConfig(guidance_scale=2.0, temperature=0.0)], ids=["cfg-topk-topp", "no-cfg", "argmax"])
def test_sampling_decoders_agree(cfg):
    model = random_model(tiny())
    classes = torch.tensor([1, 4, 9])
    uniforms = torch.rand(3, 16, generator=torch.Generator().manual_seed(6))
    decoders = {"cached": llamagen.CachedDecoder(model), "full": llamagen.FullRecompute(model),
                "static": llamagen.StaticDecoder(model, 3, guided=cfg.uses_cfg)}
    outs = {name: sample(model, classes, cfg, draw=InverseCDFDraw(uniforms), decoder=d, return_probs=True)
            for name, d in decoders.items()}
    ref = outs["full"]
    assert ref.tokens.shape == (3, 16) and ref.tokens.max() < 40
    for name, out in outs.items():
        assert torch.equal(out.tokens, ref.tokens), name
        torch.testing.assert_close(out.probs, ref.probs, atol=1e-5, rtol=1e-5)
    # teacher forcing returns the forced tokens with the same distributions
    forced = sample(model, classes, cfg, forced_tokens=ref.tokens, return_probs=True)
    assert torch.equal(forced.tokens, ref.tokens)
    torch.testing.assert_close(forced.probs, ref.probs, atol=1e-5, rtol=1e-5)
    if cfg.temperature == 0:
        assert torch.equal(ref.probs.max(dim=-1).values, torch.ones(3, 16))


def test_sampling_guidance_is_the_official_mix():
    model = random_model(tiny())
    classes = torch.tensor([2, 3])
    tokens = torch.randint(0, 40, (2, 16))
    cfg = SamplingConfig(guidance_scale=2.5, top_k=0, top_p=1.0)
    probs = sample(model, classes, cfg, forced_tokens=tokens, return_probs=True).probs
    with torch.no_grad():
        c = model.prefix_logits(tokens[:, :-1], classes)
        u = model.prefix_logits(tokens[:, :-1], model.null_condition_ids(2))
    torch.testing.assert_close(probs, (u + (c - u) * 2.5).softmax(-1), atol=1e-5, rtol=1e-5)


def test_cached_decoder_guides_before_the_head_as_the_loop_guides_the_logits():
    # with a HeadMix the decoder feeds each drawn token to its conditional and null rows and returns the
    # guided logits of the head run on the mixed rows (no bias: exactly the mix of the logits in exact arithmetic)
    from vqtok.ar.sampling import HeadMix, guide

    model = random_model(tiny())
    cond_ids = torch.tensor([1, 4, 10, 10])
    tokens = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(3))
    plain, mixed, cond_only = (llamagen.CachedDecoder(model) for _ in range(3))
    with torch.no_grad():
        for step in range(16):
            scale = 1.0 + step / 4
            if step == 0:
                ref, got, c = plain.start(cond_ids), mixed.start(cond_ids, mix=HeadMix(scale)), cond_only.start(
                    cond_ids, mix=HeadMix(None))
            else:
                fed = tokens[:, step - 1:step]
                ref = plain.step(torch.cat([fed, fed]), step)
                got, c = mixed.step(fed, step, mix=HeadMix(scale)), cond_only.step(fed, step, mix=HeadMix(None))
            assert got.shape == (2, 1, 40)
            torch.testing.assert_close(got, guide(ref, scale), atol=1e-5, rtol=1e-5, msg=f"step {step}")
            torch.testing.assert_close(c, ref[:2], atol=1e-6, rtol=1e-6, msg=f"step {step}")
        with pytest.raises(ValueError, match="token rows"):
            mixed.step(torch.zeros(4, 1, dtype=torch.long), 1, mix=HeadMix(2.0))


def test_sampling_with_the_global_generator_is_reproducible():
    model = random_model(tiny())
    cfg = SamplingConfig(guidance_scale=2.0, top_k=8)
    torch.manual_seed(7)
    a = sample(model, torch.tensor([0, 5]), cfg, draw=GeneratorDraw(None)).tokens
    torch.manual_seed(7)
    b = sample(model, torch.tensor([0, 5]), cfg).tokens
    assert torch.equal(a, b)
    assert model.training is False


def test_sampling_refuses_other_scan_orders_and_classes():
    model = random_model(tiny())
    with pytest.raises(UserError, match="raster order only"):
        sample(model, torch.tensor([0]), SamplingConfig(order="spiral-in"))
    with pytest.raises(UserError, match="outside this generator's 10 classes"):
        sample(model, torch.tensor([10]), SamplingConfig())
    with pytest.raises(ValueError, match="static decoder was built for batch 2"):
        sample(model, torch.tensor([0]), SamplingConfig(), decoder=llamagen.StaticDecoder(model, 2, guided=True))


# ------------------------------------------------------------------------------ checkpoints


def test_converted_checkpoint_loads_by_family_and_samples(tmp_path):
    from vqtok.ar.checkpoint import load_generator
    from vqtok.ar.families import family_of

    model = random_model(tiny())
    official = {"model": {**model.state_dict(), "freqs_cis": rope_table(model.config)}, "steps": 10}
    out = interop.save_converted(official, tmp_path / "gen", block_size=16, n_head=4)
    loaded, identity = load_generator(out)
    assert isinstance(loaded, LlamaGen) and family_of(loaded).name == "llamagen"
    assert identity["family"] == "llamagen" and identity["seq_len"] == 16 and identity["vocab_size"] == 40
    assert identity["tokenizer"] == {"vocab_size": 40, "tokens_per_image": 16} and identity["token_count"] == "given"
    arch = lambda c: (c.dim, c.n_layer, c.n_head, c.kv_heads, c.ffn_hidden, c.vocab_size, c.block_size, c.num_classes)  # noqa: E731
    assert arch(loaded.config) == arch(model.config)
    assert loaded.config.resid_dropout_p == 0.1  # the official training settings, for fine-tuning
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    cfg = SamplingConfig(guidance_scale=2.0, top_k=4)
    torch.manual_seed(8)
    a = sample(model, torch.tensor([1, 2]), cfg).tokens
    torch.manual_seed(8)
    b = sample(loaded, torch.tensor([1, 2]), cfg).tokens
    assert torch.equal(a, b)


def test_official_file_names_set_the_token_count(tmp_path):
    cfg = size_config("B")
    with torch.device("meta"):
        sd = LlamaGen(cfg).state_dict()
    assert interop.load_official(sd, block_size=interop.block_size_from_name(tmp_path / "c2i_B_384.pt"))[0].block_size == 576
    from vqtok.interop import detect

    assert detect(sd).NAME == "llamagen_gpt"
    assert detect({"model": sd}["model"]).NAME == "llamagen_gpt"


def test_paper_sampling_settings_of_the_releases():
    from vqtok.ar.presets import paper_sampling, preset_for

    with torch.device("meta"):
        assert LlamaGen(size_config("B")).config.identity_fields()["preset"] == "llamagen-b"
    assert llamagen.preset_for(size_config("3B", block_size=576)) == "llamagen-3b"
    assert llamagen.preset_for(tiny()) is None and preset_for(tiny()) is None
    for name, scale in {"llamagen-b": 2.0, "llamagen-l": 2.0, "llamagen-xl": 1.75, "llamagen-xxl": 1.75, "llamagen-3b": 1.65}.items():
        cfg = paper_sampling(name)
        assert (cfg.guidance_scale, cfg.guidance_schedule, cfg.temperature, cfg.top_k, cfg.top_p) == (scale, "constant", 1.0, 0, 1.0)


def test_sample_cli_runs_a_llamagen_checkpoint_and_refuses_a_vocabulary_mismatch(tmp_path):
    from typer.testing import CliRunner

    from vqtok.cli import app
    from vqtok.tokenizer.tokenizer import build_tokenizer

    tok = build_tokenizer("tiny-vqgan")  # 512 codes, 8x8 tokens
    tok.save(tmp_path / "tok")
    model = random_model(tiny(vocab_size=tok.vocab_size, block_size=64, num_classes=5))
    gen = interop.save_converted(model.state_dict(), tmp_path / "gen", tokenizer=dict(tok.identity(), path="../tok"),
                                 block_size=64, n_head=4)
    runner = CliRunner()
    result = runner.invoke(app, ["sample", "--ckpt", str(gen), "--out", str(tmp_path / "out"), "--device", "cpu",
                                 "--num-samples", "3", "--cfg", "2.0", "--top-k", "16", "--png"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 3 and (tmp_path / "out" / "grid.png").is_file()
    settings = json.loads((tmp_path / "out" / "sample.json").read_text())
    assert settings["sampling"]["guidance_scale"] == 2.0 and settings["sampling"]["top_k"] == 16
    result = runner.invoke(app, ["sample", "--ckpt", str(gen), "--out", str(tmp_path / "tok-only"), "--device", "cpu",
                                 "--num-samples", "3", "--tokens-only"])
    assert result.exit_code == 0, result.output
    tokens = np.load(tmp_path / "tok-only" / "tokens.npy")
    assert tokens.shape == (3, 8, 8) and tokens.max() < 512

    wrong = random_model(tiny(vocab_size=40, block_size=64, num_classes=5))
    bad = interop.save_converted(wrong.state_dict(), tmp_path / "gen-vocab", block_size=64, n_head=4)
    result = runner.invoke(app, ["sample", "--ckpt", str(bad), "--out", str(tmp_path / "out2"), "--device", "cpu",
                                 "--tokenizer", str(tmp_path / "tok"), "--num-samples", "1"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "512 codes but the generator samples 40" in lines[0]
    assert not (tmp_path / "out2").exists()


def test_training_helpers_for_train_ar():
    cfgs = {name: make() for name, make in llamagen.PRESETS.items()}
    assert set(cfgs) == {"llamagen-b", "llamagen-l", "llamagen-xl", "llamagen-xxl", "llamagen-3b", "llamagen-tiny"}
    assert all(llamagen.preset_for(c) == n for n, c in cfgs.items() if n != "llamagen-tiny")
    assert llamagen.token_fields(512, [[8, 8]], 64) == {"vocab_size": 512, "block_size": 64}
    with pytest.raises(UserError, match="square token grid"):
        llamagen.token_fields(512, [[6, 8]], 48)
    model = random_model(tiny()).train()
    tokens = torch.randint(0, 40, (3, 16))
    cond = torch.tensor([1, 10, 3])  # one row already dropped to the null class
    loss, acc = llamagen.train_loss(model, tokens, cond, torch.arange(16).expand(3, 16))
    with torch.no_grad():
        want = llamagen.loss(model.prefix_logits(tokens[:, :-1], cond), tokens)
    torch.testing.assert_close(loss.detach(), want)
    assert 0 <= acc.item() <= 1 and model.config.class_dropout == model.config.class_dropout_prob
    with pytest.raises(UserError, match="raster order only"):
        llamagen.train_loss(model, tokens, cond, torch.randperm(16).expand(3, 16))


# ------------------------------------------------------------------------------ train-ar recipes


@pytest.mark.parametrize("size", ["B", "L", "XL", "XXL", "3B"])
def test_llamagen_recipes_are_the_official_c2i_settings(size):
    from vqtok.train.ar_task import load_run_config

    cfg = load_run_config(f"llamagen-{size.lower()}", [])
    want = size_config(size)
    assert cfg.arch == "llamagen" and isinstance(cfg.model, LlamaGenConfig)
    assert (cfg.model.dim, cfg.model.n_layer, cfg.model.n_head, cfg.model.ffn_hidden) == (want.dim, want.n_layer, want.n_head, want.ffn_hidden)
    m = cfg.model
    assert (m.token_dropout_p, m.resid_dropout_p, m.ffn_dropout_p, m.attn_dropout_p, m.class_dropout_prob, m.drop_path_rate) == (0.1, 0.1, 0.1, 0.0, 0.1, 0.0)
    o = cfg.optim
    assert (o.kind, o.lr, tuple(o.betas), o.weight_decay, o.grad_clip, o.schedule.kind) == ("adamw", 1e-4, (0.9, 0.95), 0.05, 1.0, "constant")
    assert cfg.epochs == 300 and cfg.train.batch_size == 256 and cfg.train.amp and not cfg.train.ema


def test_llamagen_tiny_trains_through_the_engine_and_samples(tmp_path):
    from test_train_ar import BASE, make_token_dir

    from vqtok.ar.checkpoint import load_generator
    from vqtok.tokenizer.tokenizer import build_tokenizer
    from vqtok.train.ar_task import train_ar

    tok = build_tokenizer("tiny-vqgan")
    tok.save(tmp_path / "tok")
    data = np.random.default_rng(0).integers(0, 512, (12, 2, 64))
    tokens = make_token_dir(tmp_path / "wds", tok.identity(), data, [i % 3 for i in range(12)])
    result = train_ar(tokens, tmp_path / "tok", tmp_path / "run", config="llamagen-tiny",
                      overrides=BASE + ["train.steps=4"], device="cpu")
    assert result.step == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)
    model, identity = load_generator(tmp_path / "run" / "final")
    assert isinstance(model, LlamaGen) and identity["family"] == "llamagen"
    assert (model.config.vocab_size, model.config.block_size, model.config.num_classes) == (512, 64, 3)
    out = sample(model, torch.tensor([0, 2]), SamplingConfig(guidance_scale=2.0)).tokens
    assert out.shape == (2, 64) and out.max() < 512


def test_sample_cli_static_decoder_with_a_padded_last_batch_writes_the_eager_tokens(tmp_path, monkeypatch):
    # what --cuda-graphs does on CUDA, on CPU: one static decoder for --batch-size rows, the last batch padded
    from typer.testing import CliRunner

    from static_sampling import eager_and_static_tokens
    from vqtok.cli import app

    model = random_model(tiny(vocab_size=40, block_size=16, num_classes=5))
    gen = interop.save_converted(model.state_dict(), tmp_path / "gen", block_size=16, n_head=4)
    args = ["sample", "--ckpt", str(gen), "--device", "cpu", "--num-samples", "5", "--batch-size", "2", "--seed", "3",
            "--tokens-only", "--cfg", "2", "--top-p", "0.9"]
    eager, static, made = eager_and_static_tokens(
        lambda out: CliRunner().invoke(app, args + ["--out", str(out)]),
        lambda model, cfg, batch: llamagen.StaticDecoder(model, batch, cfg.uses_cfg), monkeypatch, tmp_path)
    assert len(made) == 1 and made[0].batch == 2 and made[0].rows == 4
    assert np.array_equal(eager, static)
    assert static.shape == (5, 4, 4)


def test_cuda_graph_decoder_needs_a_cuda_device():
    model = random_model(tiny())
    with pytest.raises(UserError, match="CUDA graphs need the generator on a CUDA device"):
        model.graph_decoder(2, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_decoder_matches_the_eager_cache():
    model = random_model(tiny()).cuda()
    cfg = SamplingConfig(guidance_scale=2.0, top_k=8)
    uniforms = torch.rand(3, 16, generator=torch.Generator().manual_seed(9))
    classes = torch.tensor([1, 2, 3])
    # the graphs replay the static decoder's arithmetic (CFG mixed before the head, its scale in a buffer), which
    # equals the eager cached decoder's (tested on CPU); the static decoder run eagerly is the reference here
    eager = sample(model, classes, cfg, draw=InverseCDFDraw(uniforms), decoder=llamagen.StaticDecoder(model, 3, True),
                   return_probs=True)
    decoder = model.graph_decoder(3, True)
    for _ in range(2):  # replays reuse the captured graphs
        graphed = sample(model, classes, cfg, draw=InverseCDFDraw(uniforms), decoder=decoder, return_probs=True)
        assert torch.equal(graphed.tokens, eager.tokens)
        torch.testing.assert_close(graphed.probs, eager.probs, atol=1e-5, rtol=1e-5)


def test_cfg_interval_guides_the_first_steps_then_samples_from_the_conditional_rows():
    # the official generate: prefill and decode steps i <= cfg_interval are guided, later ones use cond logits
    model = random_model(tiny())
    classes = torch.tensor([1, 4])
    forced = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    guided = sample(model, classes, SamplingConfig(guidance_scale=3.0), forced_tokens=forced, return_probs=True).probs
    cond = sample(model, classes, SamplingConfig(guidance_scale=0.0), forced_tokens=forced, return_probs=True).probs
    cut = sample(model, classes, SamplingConfig(guidance_scale=3.0, guidance_interval=4), forced_tokens=forced,
                 return_probs=True).probs
    torch.testing.assert_close(cut[:, :6], guided[:, :6])  # steps 0..5 = the first token and decode steps 0..4
    torch.testing.assert_close(cut[:, 6:], cond[:, 6:], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(guided[:, 6:], cond[:, 6:], atol=1e-3)
    with pytest.raises(UserError, match="guidance interval"):
        SamplingConfig(guidance_interval=-2)
    from vqtok.ar.sampling import describe_sampling

    assert "steps 0..5 only" in describe_sampling(SamplingConfig(guidance_scale=3.0, guidance_interval=4), 16)
