"""VAR's static-buffer decoder (the layout its CUDA graphs replay) against the eager KV-cached decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_var_gpt import PATCH, _saved_tokenizers, tiny, tiny_quantizer
from vqtok.ar.sampling import HeadMix, InverseCDFDraw, SamplingConfig, sample
from vqtok.ar.var import VAR, VARCachedDecoder
from vqtok.ar.var_graphs import VARStaticDecoder
from vqtok.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("cfg", [SamplingConfig(guidance_scale=2.5, guidance_schedule="ramp", top_k=5, top_p=0.9),
                                 SamplingConfig(guidance_scale=2.0, guidance_interval=0),
                                 SamplingConfig(guidance_scale=0.0, temperature=0.8)], ids=["ramp", "interval", "no-cfg"])
@pytest.mark.parametrize("shared_aln", [False, True])
def test_static_decoder_samples_the_cached_decoders_codes_bitwise(cfg, shared_aln):
    model = tiny(shared_aln=shared_aln)
    classes = torch.tensor([1, 4, 9])
    static = VARStaticDecoder(model, 3, cfg.uses_cfg)
    for seed in (6, 7):  # the second batch refills every buffer of the same decoder
        uniforms = torch.rand(3, model.config.seq_len, generator=torch.Generator().manual_seed(seed))
        eager = sample(model, classes, cfg, draw=InverseCDFDraw(uniforms), decoder=VARCachedDecoder(model), return_probs=True)
        got = sample(model, classes, cfg, draw=InverseCDFDraw(uniforms), decoder=static, return_probs=True)
        assert torch.equal(got.tokens, eager.tokens) and torch.equal(got.probs, eager.probs)
    # after the last step its canvas holds every scale but the last, as the eager decoder's
    per_scale = model.quantizer.split_scales(got.tokens)
    torch.testing.assert_close(static.f_hat, model.quantizer.decode_scales(per_scale[:-1]), atol=1e-6, rtol=0)


def test_static_decoder_reads_the_quantizers_search_gains_once_per_batch():
    # a tokenizer trained with scale_gain / scale_center adds g_k e + m_k per scale: the static decoder reads
    # the gains and offsets before the steps (a graph may not test the quantizer's buffers) and gives the same
    q = tiny_quantizer()
    q.config.scale_gain = q.config.scale_center = True
    K, C = len(PATCH), q.dim
    q.register_buffer("scale_rms", torch.rand(K, C) + 0.5)
    q.register_buffer("scale_mean", torch.randn(K, C) * 0.3)
    assert not torch.equal(q.gains(), torch.ones(K, C))
    model = tiny()
    model.bind_quantizer(q)
    cfg = SamplingConfig(guidance_scale=1.5, guidance_schedule="ramp")
    uniforms = torch.rand(2, model.config.seq_len, generator=torch.Generator().manual_seed(3))
    eager = sample(model, torch.tensor([2, 5]), cfg, draw=InverseCDFDraw(uniforms), decoder=VARCachedDecoder(model), return_probs=True)
    got = sample(model, torch.tensor([2, 5]), cfg, draw=InverseCDFDraw(uniforms), decoder=VARStaticDecoder(model, 2, True),
                 return_probs=True)
    assert torch.equal(got.tokens, eager.tokens) and torch.equal(got.probs, eager.probs)


def test_static_decoder_keeps_its_addresses_and_checks_its_inputs():
    model = tiny()
    decoder = VARStaticDecoder(model, 2, guided=True)
    ptrs = lambda: [t.data_ptr() for t in (decoder.logits, decoder.codes, decoder.cond_ids, decoder.f_hat,
                                           decoder.cache.k[0], decoder.mix.scale, *decoder.conditions)]
    with torch.no_grad():
        first = decoder.start(torch.tensor([1, 2, 10, 10]), mix=HeadMix(1.0))
        before = ptrs()
        out = decoder.step(torch.tensor([[3], [4]]), 1, mix=HeadMix(2.0))
        decoder.start(torch.tensor([5, 6, 10, 10]), mix=HeadMix(1.0))
    assert first.shape == (2, 1, 16) and out.shape == (2, 4, 16)
    assert first.data_ptr() == out.data_ptr() == decoder.logits.data_ptr() and ptrs() == before
    with pytest.raises(ValueError, match="runs 4 rows"):
        decoder.start(torch.tensor([1, 10]), mix=HeadMix(1.0))
    with pytest.raises(ValueError, match=r"takes \(2, 4\) codes, got \(2, 1\)"):
        decoder.step(torch.tensor([[3], [4]]), 2, mix=HeadMix(2.0))
    with pytest.raises(ValueError, match="built with CFG, got no guidance mix"):
        decoder.step(torch.tensor([[3], [4]]), 1)
    with pytest.raises(ValueError, match="static decoder was built for batch 2"):
        sample(model, torch.tensor([1]), SamplingConfig(guidance_scale=2.0), decoder=decoder)
    with pytest.raises(UserError, match="no tokenizer bound"):
        VARStaticDecoder(VAR(model.config), 2, guided=True)


def test_cuda_graph_decoder_needs_a_cuda_device():
    with pytest.raises(UserError, match="CUDA graphs need the generator on a CUDA device"):
        tiny().graph_decoder(2, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_decoder_matches_the_static_decoder_on_cuda():
    model = tiny().cuda()
    model.quantizer.cuda()
    cfg = SamplingConfig(guidance_scale=2.5, guidance_schedule="ramp", top_k=8)
    classes = torch.tensor([1, 2, 3])
    uniforms = torch.rand(3, model.config.seq_len, generator=torch.Generator().manual_seed(9))
    ref = sample(model, classes, cfg, draw=InverseCDFDraw(uniforms), decoder=VARStaticDecoder(model, 3, True), return_probs=True)
    decoder = model.graph_decoder(3, True)
    for _ in range(2):  # replays reuse the captured graphs
        graphed = sample(model, classes, cfg, draw=InverseCDFDraw(uniforms), decoder=decoder, return_probs=True)
        assert torch.equal(graphed.tokens, ref.tokens)
        torch.testing.assert_close(graphed.probs, ref.probs, atol=1e-5, rtol=1e-5)


def test_sample_cli_static_decoder_with_a_padded_last_batch_writes_the_eager_tokens(tmp_path, monkeypatch):
    # what --cuda-graphs does for VAR on CUDA, on CPU: one static decoder for --batch-size rows, the last batch
    # padded; the tokenizer is the tiny-msvq recipe's (its search gains on)
    from typer.testing import CliRunner

    from static_sampling import eager_and_static_tokens
    from vqtok.cli import app
    from vqtok.interop.var_gpt import save_converted

    torch.manual_seed(0)
    msvq, cfg = _saved_tokenizers(tmp_path)
    save_converted(VAR(cfg).state_dict(), tmp_path / "gen", tokenizer=tmp_path / "msvq")
    args = ["sample", "--ckpt", str(tmp_path / "gen"), "--device", "cpu", "--num-samples", "5", "--batch-size", "2",
            "--seed", "3", "--tokens-only", "--cfg", "2.5", "--cfg-schedule", "ramp", "--top-k", "9"]
    eager, static, made = eager_and_static_tokens(
        lambda out: CliRunner().invoke(app, args + ["--out", str(out)]),
        lambda model, cfg, batch: VARStaticDecoder(model, batch, cfg.uses_cfg), monkeypatch, tmp_path)
    assert len(made) == 1 and made[0].batch == 2 and made[0].rows == 4
    assert np.array_equal(eager, static) and static.shape[0] == 5
