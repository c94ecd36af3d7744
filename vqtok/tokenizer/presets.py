"""Named tokenizer architectures: the three official ones, from-scratch recipes and tiny CPU variants.

`PRESETS[name]()` returns a fresh `TokenizerConfig`. The official presets reproduce the released
checkpoints' architectures exactly, so `vqtok convert` output and `build_tokenizer(name)` agree:

- maskgit-vqgan-f16: the MaskGIT VQGAN that RAR/TiTok use (bytedance/1d-tokenizer), 1024 codes, 256 tokens.
- var-msvq-f16: VAR's multi-scale VQVAE `vae_ch160v4096z32`, 4096 codes, 680 tokens over 10 scales.
- llamagen-vq-f16: LlamaGen's VQ-16 (`vq_ds16_c2i.pt`), 16384 l2-normalised codes of dim 8.

The tiny presets take 64x64 images, downsample by 8 (64 tokens) and have well under a million
parameters, so tests, demos and CPU runs train in seconds.
"""

from __future__ import annotations

from typing import Callable

from vqtok.tokenizer.config import AutoencoderConfig, QuantizerConfig, TokenizerConfig

F16 = [1, 1, 2, 2, 4]
VAR_PATCH_NUMS = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]


def _maskgit_autoencoder() -> AutoencoderConfig:
    return AutoencoderConfig(
        style="maskgit", ch=128, ch_mult=list(F16), num_res_blocks=2, z_channels=256,
        attention=False, mid_attention=False, quant_conv_kernel=0,
    )


def _var_autoencoder(ch: int = 160) -> AutoencoderConfig:
    return AutoencoderConfig(style="var", ch=ch, ch_mult=list(F16), num_res_blocks=2, z_channels=32, quant_conv_kernel=3)


def _llamagen_autoencoder() -> AutoencoderConfig:
    return AutoencoderConfig(style="llamagen", ch=128, ch_mult=list(F16), num_res_blocks=2, z_channels=256, quant_conv_kernel=1)


def _tiny_autoencoder(style: str = "llamagen") -> AutoencoderConfig:
    # f8 at 64 px -> an 8x8 grid; one block per level and no attention keeps it fast on a CPU.
    return AutoencoderConfig(
        style=style, ch=32, ch_mult=[1, 1, 1, 2], num_res_blocks=1, decoder_num_res_blocks=1, z_channels=32,
        attention=False, mid_attention=False, quant_conv_kernel=1 if style == "llamagen" else 3,
    )


def _vq(**params) -> QuantizerConfig:
    return QuantizerConfig(kind="vq", params=params)


def _msvq(codebook_size: int, dim: int, patch_nums: list[int], using_znorm: bool = False) -> QuantizerConfig:
    return QuantizerConfig(
        kind="msvq",
        params={"codebook_size": codebook_size, "dim": dim, "patch_nums": list(patch_nums),
                "beta": 0.25, "quant_resi": 0.5, "share_quant_resi": 4, "using_znorm": using_znorm},
    )


def maskgit_vqgan_f16() -> TokenizerConfig:
    return TokenizerConfig(
        preset="maskgit-vqgan-f16", resolution=256, value_range=(0.0, 1.0),
        autoencoder=_maskgit_autoencoder(),
        # taming / MaskGIT convention: beta scales the codebook term (the loss value is the same here)
        quantizer=_vq(codebook_size=1024, dim=256, beta=0.25, beta_on="codebook"),
    )


def var_msvq_f16() -> TokenizerConfig:
    return TokenizerConfig(
        preset="var-msvq-f16", resolution=256, value_range=(-1.0, 1.0),
        autoencoder=_var_autoencoder(160), quantizer=_msvq(4096, 32, VAR_PATCH_NUMS),
    )


def llamagen_vq_f16() -> TokenizerConfig:
    return TokenizerConfig(
        preset="llamagen-vq-f16", resolution=256, value_range=(-1.0, 1.0),
        autoencoder=_llamagen_autoencoder(),
        quantizer=_vq(codebook_size=16384, dim=8, l2_norm=True, beta=0.25, usage_buffer=65536),
    )


def vqgan_f16() -> TokenizerConfig:
    # From scratch: LlamaGen's recipe (low-dim l2-normalised codes keep usage high at 16k codes).
    return TokenizerConfig(
        preset="vqgan-f16", resolution=256, value_range=(-1.0, 1.0),
        autoencoder=_llamagen_autoencoder(), quantizer=_vq(codebook_size=16384, dim=8, l2_norm=True, beta=0.25),
    )


def fsq_f16() -> TokenizerConfig:
    # FSQ paper level preset for ~2^16 codes: [8, 8, 8, 5, 5, 5] = 64,000.
    return TokenizerConfig(
        preset="fsq-f16", resolution=256, value_range=(-1.0, 1.0),
        autoencoder=_llamagen_autoencoder(), quantizer=QuantizerConfig(kind="fsq", params={"levels": [8, 8, 8, 5, 5, 5]}),
    )


def lfq_f16() -> TokenizerConfig:
    # Open-MAGVIT2 / MAGVIT-v2: 18 binary latents = 2^18 codes.
    return TokenizerConfig(
        preset="lfq-f16", resolution=256, value_range=(-1.0, 1.0),
        autoencoder=_llamagen_autoencoder(), quantizer=QuantizerConfig(kind="lfq", params={"codebook_size": 2**18}),
    )


def msvq_f16() -> TokenizerConfig:
    # VAR's architecture trained from scratch (VAR's tokenizer training code was never released), with
    # cosine code search (VAR's own `using_znorm` option) against the coarse-scale collapse users report.
    return TokenizerConfig(
        preset="msvq-f16", resolution=256, value_range=(-1.0, 1.0),
        autoencoder=_var_autoencoder(160), quantizer=_msvq(4096, 32, VAR_PATCH_NUMS, using_znorm=True),
    )


def tiny_vqgan() -> TokenizerConfig:
    return TokenizerConfig(
        preset="tiny-vqgan", resolution=64, value_range=(-1.0, 1.0),
        autoencoder=_tiny_autoencoder(), quantizer=_vq(codebook_size=512, dim=8, l2_norm=True, beta=0.25),
    )


def tiny_fsq() -> TokenizerConfig:
    return TokenizerConfig(
        preset="tiny-fsq", resolution=64, value_range=(-1.0, 1.0),
        autoencoder=_tiny_autoencoder(), quantizer=QuantizerConfig(kind="fsq", params={"levels": [8, 5, 5, 5]}),
    )


def tiny_lfq() -> TokenizerConfig:
    return TokenizerConfig(
        preset="tiny-lfq", resolution=64, value_range=(-1.0, 1.0),
        autoencoder=_tiny_autoencoder(), quantizer=QuantizerConfig(kind="lfq", params={"codebook_size": 2**10}),
    )


def tiny_msvq() -> TokenizerConfig:
    return TokenizerConfig(
        preset="tiny-msvq", resolution=64, value_range=(-1.0, 1.0),
        autoencoder=_tiny_autoencoder("var"), quantizer=_msvq(512, 8, [1, 2, 3, 4, 6, 8]),
    )


PRESETS: dict[str, Callable[[], TokenizerConfig]] = {
    "maskgit-vqgan-f16": maskgit_vqgan_f16,
    "var-msvq-f16": var_msvq_f16,
    "llamagen-vq-f16": llamagen_vq_f16,
    "vqgan-f16": vqgan_f16,
    "fsq-f16": fsq_f16,
    "lfq-f16": lfq_f16,
    "msvq-f16": msvq_f16,
    "tiny-vqgan": tiny_vqgan,
    "tiny-fsq": tiny_fsq,
    "tiny-lfq": tiny_lfq,
    "tiny-msvq": tiny_msvq,
}
