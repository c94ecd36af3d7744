"""Per-image reconstruction metrics: PSNR and SSIM, batched, in torch.

Both take images as float tensors (B, C, H, W) on the [0, 1] scale and return one value per image (B,),
so a caller can report per-image numbers and average them over a whole evaluation set.

SSIM is the standard one of Wang et al. (2004): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01,
K2 = 0.03, population (not sample) statistics, computed per channel over the "valid" region (no padding)
and averaged over channels and positions. This matches `pytorch_msssim`/torchmetrics and scikit-image's
`structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`.

`data_range=2.0` exists only to reproduce LlamaGen's published SSIM column, which passed [0, 1] images
with `data_range=2.0` to scikit-image (making C1 and C2 four times larger, so SSIM reads higher). Note
that LlamaGen also used scikit-image's default 7x7 uniform window; `window="uniform"` with `win_size=7`
reproduces that too. Use the defaults for every number you compare across tokenizers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vqtok.errors import UserError

SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise UserError(f"images to compare have different shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() != 4:
        raise UserError(f"expected image batches of shape (B, C, H, W), got {tuple(x.shape)}")


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image, (B,), computed in float64 so tiny errors are not lost."""
    _check_pair(x, y)
    diff = x.double() - y.double()
    return diff.pow(2).flatten(1).mean(dim=1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, (B,); identical images give +inf."""
    err = mse(x, y)
    return 10.0 * torch.log10(data_range**2 / err)  # 1/0 -> inf, the usual convention


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalised 2-D Gaussian kernel (size, size), the outer product of two 1-D Gaussians."""
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
    window: str = "gaussian",
) -> torch.Tensor:
    """Structural similarity per image, (B,). See the module docstring for the exact definition.

    `window="uniform"` uses a flat win_size x win_size window with sample covariance (scikit-image's
    defaults, win_size 7), kept only for parity with papers that used those defaults.
    """
    _check_pair(x, y)
    _, channels, height, width = x.shape
    if min(height, width) < win_size:
        raise UserError(f"SSIM needs images of at least {win_size}x{win_size} pixels, got {height}x{width}")
    # float64: the variance terms are differences of nearly equal numbers.
    x = x.double()
    y = y.double()
    if window == "gaussian":
        kernel = gaussian_window(win_size, sigma)
        cov_norm = 1.0
    elif window == "uniform":
        kernel = torch.full((win_size, win_size), 1.0 / win_size**2, dtype=torch.float64)
        n = win_size**2
        cov_norm = n / (n - 1)  # scikit-image's unbiased (sample) estimate
    else:
        raise UserError(f"unknown SSIM window '{window}'; use gaussian or uniform")
    kernel = kernel.to(x.device).expand(channels, 1, win_size, win_size)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)  # valid region only, no padding

    mu_x, mu_y = filt(x), filt(y)
    var_x = cov_norm * (filt(x * x) - mu_x * mu_x)
    var_y = cov_norm * (filt(y * y) - mu_y * mu_y)
    cov_xy = cov_norm * (filt(x * y) - mu_x * mu_y)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).flatten(1).mean(dim=1)

