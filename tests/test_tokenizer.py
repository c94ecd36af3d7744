"""The Tokenizer facade, presets, checkpoints and `vqtok convert`, on tiny CPU models."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from vqtok.cli import app
from vqtok.config import ConfigError
from vqtok.errors import UserError
from vqtok.tokenizer.blocks import NORM_EPS, ResnetBlock
from vqtok.tokenizer.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig
from vqtok.tokenizer.presets import PRESETS
from vqtok.tokenizer.tokenizer import Tokenizer, build_tokenizer, load_tokenizer, tokenizer_config_from_dict

TINY = ["tiny-vqgan", "tiny-fsq", "tiny-lfq", "tiny-msvq"]
runner = CliRunner()


def _images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


# ------------------------------------------------------------------------------------------- facade


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_round_trip(name):
    tok = build_tokenizer(name)
    assert sum(p.numel() for p in tok.parameters()) < 1_000_000
    x = _images()
    idx = tok.encode(x)
    assert idx.dtype == torch.int64 and idx.shape == (2, tok.tokens_per_image)
    assert int(idx.min()) >= 0 and int(idx.max()) < tok.vocab_size
    assert tok.tokens_per_image == sum(h * w for h, w in tok.scales)
    rec = tok.decode(idx)
    assert rec.shape == x.shape and float(rec.min()) >= 0.0 and float(rec.max()) <= 1.0
    # decode(encode(x)) is what the training forward reconstructs (up to the clamp)
    tok.eval()
    out = tok(x)
    assert torch.equal(out.indices, idx)
    torch.testing.assert_close(out.recon.clamp(0, 1), rec, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_training_forward_gives_gradients_to_encoder_and_decoder(name):
    tok = build_tokenizer(name).train()
    out = tok(_images())
    assert out.aux["loss"].ndim == 0
    ((out.recon - _images()) ** 2).mean().add(out.aux["loss"]).backward()
    assert tok.encoder.conv_in.weight.grad is not None and tok.encoder.conv_in.weight.grad.abs().sum() > 0
    assert tok.last_layer_weight().grad is not None
    assert tok.last_layer_weight() is tok.decoder.conv_out.weight


def test_encode_leaves_training_state_alone():
    tok = build_tokenizer("tiny-msvq").train()  # its quantizer keeps a usage EMA in training
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    tok.encode(_images())
    assert tok.quantize.training
    assert all(torch.equal(before[k], v) for k, v in tok.state_dict().items())


def test_single_scale_encode_takes_other_sizes():
    tok = build_tokenizer("tiny-vqgan")
    idx = tok.encode(_images(size=128))
    assert idx.shape == (2, 256)  # 16x16 grid at f8
    assert tok.decode(idx).shape == (2, 3, 128, 128)


def test_bad_inputs_are_user_errors():
    tok = build_tokenizer("tiny-vqgan")
    with pytest.raises(UserError, match="multiple of"):
        tok.encode(torch.rand(1, 3, 60, 64))
    with pytest.raises(UserError, match=r"\(B, 3, H, W\)"):
        tok.encode(torch.rand(3, 64, 64))
    idx = tok.encode(_images())
    with pytest.raises(UserError, match="outside the codebook"):
        tok.decode(idx.clone().fill_(tok.vocab_size))
    with pytest.raises(UserError, match="outside the codebook"):
        tok.decode(idx.clone().fill_(-1))
    with pytest.raises(UserError, match="tokens per image"):
        tok.decode(idx[:, :10])
    with pytest.raises(UserError, match="integers"):
        tok.decode(idx.float())
    ms = build_tokenizer("tiny-msvq")
    with pytest.raises(UserError, match="64x64"):
        ms.encode(_images(size=32))
    with pytest.raises(UserError, match="tokens per image"):
        ms.decode(torch.zeros(1, 64, dtype=torch.long))


# ------------------------------------------------------------------------------------------- checkpoints


def test_save_load_identity_and_hash(tmp_path):
    tok = build_tokenizer("tiny-vqgan").eval()
    x = _images()
    tok.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.yaml", "model.safetensors", "tokenizer.json"]
    ident = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert ident == tok.identity()
    assert ident["vocab_size"] == 512 and ident["scales"] == [[8, 8]] and ident["tokens_per_image"] == 64
    assert ident["preset"] == "tiny-vqgan" and ident["index_dtype"] == "uint16" and len(ident["hash"]) == 64
    loaded = load_tokenizer(tmp_path / "tok")
    assert not loaded.training
    assert loaded.identity() == ident
    assert torch.equal(loaded.encode(x), tok.encode(x))
    # other weights (an EMA copy, say) give another hash
    other = {k: v + 1 if v.is_floating_point() else v for k, v in tok.state_dict().items()}
    tok.save(tmp_path / "ema", state_dict=other)
    assert load_tokenizer(tmp_path / "ema").identity()["hash"] != ident["hash"]


def test_multiscale_identity_lists_every_scale(tmp_path):
    tok = build_tokenizer("tiny-msvq")
    ident = tok.identity()
    assert ident["scales"] == [[1, 1], [2, 2], [3, 3], [4, 4], [6, 6], [8, 8]]
    assert ident["tokens_per_image"] == 130
    images = tok.decode_progressive(tok.encode(_images()))
    assert len(images) == 6 and all(im.shape == (2, 3, 64, 64) for im in images)


def test_load_refuses_modified_or_mismatched_checkpoints(tmp_path):
    from vqtok.weights import save_safetensors

    tok = build_tokenizer("tiny-vqgan")
    tok.save(tmp_path / "tok")
    state = {k: v.clone() for k, v in tok.state_dict().items()}
    state["decoder.conv_out.bias"] += 1
    save_safetensors(state, tmp_path / "tok" / "model.safetensors")
    with pytest.raises(UserError, match="modified after saving"):
        load_tokenizer(tmp_path / "tok")
    (tmp_path / "tok" / "config.yaml").write_text("preset: tiny-fsq\n")
    with pytest.raises(UserError, match="does not match its config.yaml"):
        load_tokenizer(tmp_path / "tok")
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------- configs and presets


def test_config_from_dict_with_preset_and_overrides():
    cfg = tokenizer_config_from_dict({"preset": "tiny-vqgan", "quantizer": {"params": {"codebook_size": 64}}})
    assert cfg.quantizer.params["codebook_size"] == 64 and cfg.quantizer.params["l2_norm"] is True
    assert build_tokenizer({"preset": "tiny-vqgan", "autoencoder": {"ch": 64}}).encoder.conv_in.weight.shape[0] == 64
    switched = tokenizer_config_from_dict({"preset": "tiny-vqgan", "quantizer": {"kind": "fsq", "params": {"levels": [5, 5]}}})
    assert build_tokenizer(switched).vocab_size == 25
    with pytest.raises(ConfigError, match="unknown tokenizer preset"):
        tokenizer_config_from_dict({"preset": "nope"})
    with pytest.raises(ConfigError, match="unknown config key 'quantizer.params.bogus'"):
        tokenizer_config_from_dict({"preset": "tiny-vqgan", "quantizer": {"params": {"bogus": 1}}})
    with pytest.raises(ConfigError, match="multiples of 32"):
        tokenizer_config_from_dict({"preset": "tiny-vqgan", "autoencoder": {"ch": 24}})
    with pytest.raises(UserError, match="unknown tokenizer preset"):
        build_tokenizer("nope")


def test_official_presets_have_the_released_sizes():
    expected = {"maskgit-vqgan-f16": (54_515_587, 1024, 256), "var-msvq-f16": (108_948_355, 4096, 680),
                "llamagen-vq-f16": (71_883_403, 16384, 256)}
    for name, (params, vocab, tokens) in expected.items():
        with torch.device("meta"):
            tok = build_tokenizer(name)
        assert (sum(p.numel() for p in tok.parameters()), tok.vocab_size, tok.tokens_per_image) == (params, vocab, tokens), name
    assert set(PRESETS) >= {"vqgan-f16", "fsq-f16", "lfq-f16", "msvq-f16", *TINY}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_groupnorm_uses_eps_1e6(name):
    with torch.device("meta"):
        tok = build_tokenizer(name)
    norms = [m for m in tok.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.eps == NORM_EPS == 1e-6 and m.num_groups == 32 for m in norms)


def test_maskgit_shortcut_is_applied_to_the_block_output():
    block = ResnetBlock(32, 64, maskgit=True).eval()
    assert block.nin_shortcut.weight.shape == (64, 64, 1, 1) and block.nin_shortcut.bias is None
    assert block.conv1.bias is None and block.conv2.bias is None
    x = torch.randn(1, 32, 8, 8)
    h = block.conv2(torch.nn.functional.silu(block.norm2(block.conv1(torch.nn.functional.silu(block.norm1(x))))))
    torch.testing.assert_close(block(x), h + block.nin_shortcut(h))
    taming = ResnetBlock(32, 64).eval()
    assert taming.nin_shortcut.weight.shape == (64, 32, 1, 1)


# ------------------------------------------------------------------------------------------- vqtok convert


def _small(style: str, **quant) -> TokenizerConfig:
    """Fixture-sized official-format architectures (vqtok names = official names)."""
    if style == "maskgit":
        ae = AutoencoderConfig(style="maskgit", ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=32,
                               attention=False, mid_attention=False, quant_conv_kernel=0)
        return TokenizerConfig(resolution=32, value_range=(0.0, 1.0), autoencoder=ae,
                               quantizer=QuantizerConfig("vq", {"codebook_size": 64, "dim": 32, "beta_on": "codebook"}))
    if style == "llamagen":
        ae = AutoencoderConfig(style="llamagen", ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=32, quant_conv_kernel=1)
        return TokenizerConfig(resolution=32, value_range=(-1.0, 1.0), autoencoder=ae,
                               quantizer=QuantizerConfig("vq", {"codebook_size": 64, "dim": 8, "l2_norm": True, "usage_buffer": 128}))
    ae = AutoencoderConfig(style="var", ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1, z_channels=8, quant_conv_kernel=3)
    return TokenizerConfig(resolution=32, value_range=(-1.0, 1.0), autoencoder=ae,
                           quantizer=QuantizerConfig("msvq", {"codebook_size": 64, "dim": 8, "patch_nums": [1, 2, 3, 4]}))


def _randomize(tok: Tokenizer) -> Tokenizer:
    """Re-draw every weight (as the fixtures do) so no zero/identity init can hide a mapping error."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tok.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "embedding" in name:
                p.copy_(noise)
            elif p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(noise * 0.05 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return tok.eval()


@pytest.mark.parametrize("style,arch", [("maskgit", "maskgit_vqgan"), ("var", "var_vqvae"), ("llamagen", "llamagen_vq")])
def test_convert_official_layouts(tmp_path, style, arch):
    src = _randomize(Tokenizer(_small(style)))
    path = tmp_path / "official.pth"
    torch.save(src.state_dict(), path)  # an official file is a plain state dict under these names
    result = runner.invoke(app, ["convert", str(path), "--out", str(tmp_path / "ckpt")])
    assert result.exit_code == 0, result.output
    assert "wrote tokenizer checkpoint" in result.output and arch in result.output
    tok = load_tokenizer(tmp_path / "ckpt")
    assert tok.config.autoencoder == src.config.autoencoder
    x = _images(size=32)
    assert torch.equal(tok.encode(x), src.encode(x))
    torch.testing.assert_close(tok.decode(tok.encode(x)), src.decode(src.encode(x)))
    # existing output is not replaced without --overwrite; with --arch the named format is used
    again = runner.invoke(app, ["convert", str(path), "--out", str(tmp_path / "ckpt")])
    assert again.exit_code == 2 and "--overwrite" in again.output
    named = runner.invoke(app, ["convert", str(path), "--out", str(tmp_path / "ckpt"), "--overwrite", "--arch", arch.replace("_", "-")])
    assert named.exit_code == 0, named.output


def test_convert_refuses_pickled_llamagen_checkpoint_without_trust(tmp_path):
    src = _randomize(Tokenizer(_small("llamagen")))
    path = tmp_path / "vq_ds16_c2i.pt"
    # LlamaGen training checkpoints keep weights under "model" beside a pickled argparse.Namespace
    torch.save({"model": src.state_dict(), "steps": 10, "args": argparse.Namespace(vq_model="VQ-16")}, path)
    refused = runner.invoke(app, ["convert", str(path), "--out", str(tmp_path / "ckpt")])
    assert refused.exit_code == 2
    assert "--trust-pickle" in refused.output and "Traceback" not in refused.output
    assert not (tmp_path / "ckpt").exists()
    trusted = runner.invoke(app, ["convert", str(path), "--out", str(tmp_path / "ckpt"), "--trust-pickle"])
    assert trusted.exit_code == 0, trusted.output
    tok = load_tokenizer(tmp_path / "ckpt")
    assert torch.equal(tok.quantize.codebook_used, src.quantize.codebook_used)
    assert torch.equal(tok.encode(_images(size=32)), src.encode(_images(size=32)))


def test_convert_rejects_unknown_keys_and_wrong_arch(tmp_path):
    path = tmp_path / "other.safetensors"
    from vqtok.weights import save_safetensors

    save_safetensors({"backbone.layer1.weight": torch.zeros(4, 4)}, path)
    result = runner.invoke(app, ["convert", str(path), "--out", str(tmp_path / "ckpt")])
    assert result.exit_code == 2
    assert "keys match no known architecture (known: " in result.output and "maskgit_vqgan" in result.output
    assert not (tmp_path / "ckpt").exists()

    maskgit = tmp_path / "maskgit.bin"
    torch.save(Tokenizer(_small("maskgit")).state_dict(), maskgit)
    wrong = runner.invoke(app, ["convert", str(maskgit), "--out", str(tmp_path / "ckpt"), "--arch", "llamagen_vq"])
    assert wrong.exit_code == 2 and "does not look like a llamagen_vq" in wrong.output
    unknown = runner.invoke(app, ["convert", str(maskgit), "--out", str(tmp_path / "ckpt"), "--arch", "vit"])
    assert unknown.exit_code == 2 and "unknown architecture 'vit'" in unknown.output
    # a truncated state dict names what is missing
    state = Tokenizer(_small("maskgit")).state_dict()
    state.pop("decoder.conv_out.bias")
    torch.save(state, maskgit)
    partial = runner.invoke(app, ["convert", str(maskgit), "--out", str(tmp_path / "ckpt")])
    assert partial.exit_code == 2 and "decoder.conv_out.bias" in partial.output
    assert not (tmp_path / "ckpt").exists()


def test_convert_picks_the_ema_entry_with_key(tmp_path):
    model = _randomize(Tokenizer(_small("llamagen")))
    ema = _randomize(Tokenizer(_small("llamagen")))
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)  # a different set of weights under "ema"
    path = tmp_path / "vq_ds16_c2i.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "steps": 10}, path)
    default = runner.invoke(app, ["convert", str(path), "--out", str(tmp_path / "model")])
    picked = runner.invoke(app, ["convert", str(path), "--out", str(tmp_path / "ema"), "--key", "ema"])
    assert default.exit_code == 0 and picked.exit_code == 0, default.output + picked.output
    assert torch.equal(load_tokenizer(tmp_path / "model").quantize.embedding.weight, model.quantize.embedding.weight)
    assert torch.equal(load_tokenizer(tmp_path / "ema").quantize.embedding.weight, ema.quantize.embedding.weight)
    missing = runner.invoke(app, ["convert", str(path), "--out", str(tmp_path / "x"), "--key", "nope"])
    assert missing.exit_code == 2 and "has no entry 'nope'" in missing.output
