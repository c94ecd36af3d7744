"""PSNR, SSIM and codebook statistics."""

import math

import numpy as np
import pytest
import torch

from vqtok.errors import UserError
from vqtok.eval.codebook import CodebookStats, max_entropy_bits, summarize_counts
from vqtok.eval.image_metrics import gaussian_window, psnr, ssim


def ssim_by_definition(x: np.ndarray, y: np.ndarray, data_range=1.0, win=11, sigma=1.5) -> float:
    """Direct numpy SSIM (Wang et al. 2004): every valid window position, per channel, averaged."""
    g = np.exp(-((np.arange(win) - (win - 1) / 2) ** 2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - win + 1):
            for j in range(x.shape[2] - win + 1):
                a, b = x[c, i : i + win, j : j + win], y[c, i : i + win, j : j + win]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
                cov = (w * (a - ma) * (b - mb)).sum()
                values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_psnr_known_values():
    x = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    y = x.clone()
    y[0] += 0.1  # mse 0.01 -> 20 dB
    y[1] += 0.5  # mse 0.25 -> 6.0206 dB
    out = psnr(x, y)
    assert out.shape == (2,)
    assert out[0].item() == pytest.approx(20.0, abs=1e-9)
    assert out[1].item() == pytest.approx(10 * math.log10(4), abs=1e-9)
    assert psnr(x, y, data_range=2.0)[0].item() == pytest.approx(20.0 + 20 * math.log10(2), abs=1e-9)
    assert math.isinf(psnr(x, x)[0].item())


def test_ssim_matches_definition_on_random_images():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 14, generator=g)
    y = (x + 0.15 * torch.randn(2, 3, 16, 14, generator=g)).clamp(0, 1)
    got = ssim(x, y)
    for b in range(2):
        ref = ssim_by_definition(x[b].double().numpy(), y[b].double().numpy())
        assert got[b].item() == pytest.approx(ref, abs=1e-10)
    # LlamaGen parity option: only the constants change.
    ref2 = ssim_by_definition(x[0].double().numpy(), y[0].double().numpy(), data_range=2.0)
    assert ssim(x, y, data_range=2.0)[0].item() == pytest.approx(ref2, abs=1e-10)
    assert ssim(x, y, data_range=2.0)[0] > got[0]


def test_ssim_analytic_cases():
    x = torch.rand(1, 3, 12, 12)
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-12)
    # Two constant images: variances vanish and SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b, c1 = 0.2, 0.7, 0.01**2
    got = ssim(torch.full((1, 1, 11, 11), a, dtype=torch.float64), torch.full((1, 1, 11, 11), b, dtype=torch.float64)).item()
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    # Inverting contrast around the mean gives negative structure term.
    assert ssim(x, 1 - x).item() < 0


def test_ssim_skimage_parity_when_available():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 20, 20, generator=g)
    y = (x + 0.1 * torch.randn(1, 3, 20, 20, generator=g)).clamp(0, 1)
    xn, yn = x[0].permute(1, 2, 0).double().numpy(), y[0].permute(1, 2, 0).double().numpy()
    ref = metrics.structural_similarity(xn, yn, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert ssim(x, y).item() == pytest.approx(ref, abs=1e-6)
    ref7 = metrics.structural_similarity(xn, yn, data_range=2.0, channel_axis=-1)
    assert ssim(x, y, data_range=2.0, window="uniform", win_size=7).item() == pytest.approx(ref7, abs=1e-6)


def test_gaussian_window_and_errors():
    w = gaussian_window()
    assert w.shape == (11, 11) and w.sum().item() == pytest.approx(1.0)
    assert w[5, 5] == w.max()
    with pytest.raises(UserError, match="at least 11x11"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(UserError, match="different shapes"):
        psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))


def test_codebook_usage_and_perplexity_single_scale():
    stats = CodebookStats(vocab_size=8, scales=[(2, 2)])
    stats.update(torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]]))
    rep = stats.report()
    assert rep["usage"] == 0.5 and rep["codes_used"] == 4 and rep["tokens"] == 8
    assert rep["entropy_bits"] == pytest.approx(2.0)
    assert rep["perplexity"] == pytest.approx(4.0)
    assert "per_scale" not in rep
    # accumulation across batches, not per batch: a second batch of new codes fills the codebook
    stats.update(torch.tensor([[4, 5, 6, 7]]))
    assert stats.overall().usage == 1.0
    assert stats.overall().entropy_bits < max_entropy_bits(8)  # codes 0..3 are twice as frequent


def test_codebook_per_scale_for_multiscale():
    stats = CodebookStats(vocab_size=4, scales=[(1, 1), (2, 2)])
    tokens = torch.tensor([[3, 0, 0, 1, 1], [3, 2, 2, 2, 2]])
    stats.update(tokens)
    rep = stats.report()
    first, second = rep["per_scale"]
    assert first["scale"] == "1x1" and first["codes_used"] == 1 and first["perplexity"] == pytest.approx(1.0)
    assert second["scale"] == "2x2" and second["codes_used"] == 3 and second["tokens"] == 8
    p = np.array([2, 2, 4]) / 8
    assert second["entropy_bits"] == pytest.approx(float(-(p * np.log2(p)).sum()))
    assert rep["codes_used"] == 4 and rep["tokens"] == 10
    with pytest.raises(UserError, match="expected 5 tokens"):
        stats.update(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(UserError, match="0..3"):
        stats.update(torch.full((1, 5), 4))


def test_summarize_empty_histogram():
    s = summarize_counts(torch.zeros(5, dtype=torch.long))
    assert s.usage == 0 and s.tokens == 0
