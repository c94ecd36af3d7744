import pytest
import torch

from vqtok.errors import UserError
from vqtok.losses.discriminators import (
    DiscriminatorConfig, MaskGITDiscriminator, PatchGANDiscriminator, StyleGANDiscriminator, build_discriminator,
)


@pytest.mark.parametrize("res", [64, 128, 256])
def test_output_shapes(res):
    x = torch.rand(2, 3, res, res)
    with torch.no_grad():
        assert StyleGANDiscriminator(res, channel_scale=0.125)(x).shape == (2,)
        assert MaskGITDiscriminator(16)(x).shape == (2, 1, 16, 16)
        patch = {64: 6, 128: 14, 256: 30}[res]
        assert PatchGANDiscriminator(8, 3)(x).shape == (2, 1, patch, patch)


def test_full_size_parameter_counts_match_llamagen():
    # LlamaGen's modules: 36,500,225 (StyleGAN at 256) and 2,765,633 (PatchGAN ndf 64, 3 layers)
    assert sum(p.numel() for p in StyleGANDiscriminator(256).parameters()) == 36_500_225
    assert sum(p.numel() for p in PatchGANDiscriminator(64, 3).parameters()) == 2_765_633


def test_stylegan_rejects_other_sizes_and_builder_dispatch():
    d = StyleGANDiscriminator(64, channel_scale=0.125)
    with pytest.raises(UserError):
        d(torch.rand(1, 3, 32, 32))
    with pytest.raises(UserError):
        StyleGANDiscriminator(48)
    assert isinstance(build_discriminator(DiscriminatorConfig(kind="maskgit", channels=16), 64), MaskGITDiscriminator)


def test_discriminators_backpropagate_to_inputs():
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    for d in (StyleGANDiscriminator(64, 0.125), MaskGITDiscriminator(16), PatchGANDiscriminator(8)):
        x.grad = None
        d(x).mean().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
